"""The evaluation's metrics as mergeable objects, the way torchmetrics' `merge_state` works: a metric
holds its settings and a state; `partial(shard)` is the same metric over one committed shard's files,
`merge(other)` the metric over both sets of shards, `compute()` its typed result
(imagemill.core.evaluation_results), whose `report_table` the report shows.

`merge` is associative and commutative over disjoint sets of shards, so partials merge in any
grouping or order (float sums up to rounding). What a state is differs, and each metric declares it
(`state`):
- "sums": exact sufficient statistics added up (FID's feature sums, IS's class sums);
- "sample": a seeded bottom-k sample that merges to the same sample whatever the grouping (KID,
  diversity; imagemill.evaluation.embedding_passes);
- "shards": the set of shards itself. Near-duplicates and leakage compare images across shards,
  so no per-shard summary of them merges; their state is which shards to stream and `compute`
  reads those shards' embedding files again, one at a time.

The post-pass (imagemill.evaluation.post_pass) reads each shard's files once (`read_shards`) and
folds every metric over them (`merge_over`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal, Protocol, Self, TypeVar

import numpy as np
import pyarrow.parquet as pq

from imagemill.core.features import FeatureSums, sums_from_table
from imagemill.core.layout import OutputLayout
from imagemill.evaluation.embedding_passes import read_shard_embeddings

Result = TypeVar("Result", covariant=True)
StateKind = Literal["sums", "sample", "shards"]


@dataclass(frozen=True)
class ShardEvaluation:
    """One committed shard's evaluation files, as metrics take their partial of it."""

    shard_id: str
    finished_at: str | None  # when it was committed: the derived files' stamps name shards by it
    sums: dict[str | None, FeatureSums]  # per label (JOB_WIDE: the shard's); empty without the file
    labels: list[str | None]  # of each embedded image
    vectors: np.ndarray | None  # (n, d) embeddings; None without the file

    @property
    def images(self) -> int:
        """How many of the shard's images were embedded."""
        return 0 if self.vectors is None else len(self.vectors)


class Metric(Protocol[Result]):
    """A dataset metric over a set of committed shards (module docstring)."""

    state: ClassVar[StateKind]

    def partial(self, shard: ShardEvaluation) -> Self:
        """This metric, with the same settings, over one shard."""
        ...

    def merge(self, other: Self) -> Self:
        """This metric over both metrics' shards (disjoint sets); neither is changed."""
        ...

    def compute(self) -> Result:
        """The typed result over the shards merged so far."""
        ...


@dataclass(frozen=True)
class StreamedShards:
    """The state of a metric that streams the shards' embedding files again ("shards"): which shards
    (id → finished_at, as the derived file's stamp names them) and how many images they embedded (what
    picks the search method). Shards are disjoint, so the union and the sum merge in any order."""

    shards: dict[str, str | None] = field(default_factory=dict)
    images: int = 0

    @classmethod
    def of(cls, shard: ShardEvaluation) -> StreamedShards:
        return cls({shard.shard_id: shard.finished_at}, shard.images)

    def merge(self, other: StreamedShards) -> StreamedShards:
        return StreamedShards(self.shards | other.shards, self.images + other.images)


class StreamsShards:
    """The partial and merge of a metric whose state is StreamedShards (near-duplicates, leakage): the
    metric is a frozen dataclass with a `streamed` field, and only its compute differs."""

    streamed: StreamedShards

    def partial(self, shard: ShardEvaluation) -> Self:
        return replace(self, streamed=StreamedShards.of(shard))

    def merge(self, other: Self) -> Self:
        return replace(self, streamed=self.streamed.merge(other.streamed))


def read_shards(output: OutputLayout, finished: dict[str, str | None]) -> Iterator[ShardEvaluation]:
    """Each committed shard's files (`finished`: shard id → finished_at), in shard id order, one shard
    in memory at a time. A shard committed before `evaluation:` was added has neither file and gives
    an empty partial."""
    embedded = read_shard_embeddings(output, sorted(finished))
    pending = next(embedded, None)
    for shard_id in sorted(finished):
        labels: list[str | None] = []
        vectors = None
        if pending is not None and pending[0] == shard_id:
            _, _, labels, vectors = pending
            pending = next(embedded, None)
        yield ShardEvaluation(shard_id, finished[shard_id], _feature_sums(output, shard_id), labels, vectors)


def _feature_sums(output: OutputLayout, shard_id: str) -> dict[str | None, FeatureSums]:
    try:
        with output.fs.open(output.path(OutputLayout.feature_stats_path(shard_id)), "rb") as f:
            return sums_from_table(pq.read_table(f))
    except FileNotFoundError:
        return {}


def merge_over(metrics: Sequence[Metric[Any]], shards: Iterable[ShardEvaluation]) -> list[Metric[Any]]:
    """Each metric merged with its partial of every shard, in the order given."""
    merged = list(metrics)
    for shard in shards:
        merged = [metric.merge(metric.partial(shard)) for metric in merged]
    return merged
