"""Near-duplicates within a job: images whose embeddings' cosine similarity is at least
`evaluation.duplicate_threshold`, each marked with the group it belongs to (`duplicates.parquet`).

Exact and streamed, in one of two ways (imagemill.evaluation.similarity_search chooses by size; both
give the same file):
- torch: the shards' embedding files are taken in blocks of about BLOCK_ROWS rows, and each block is
  compared with itself and with every later shard, read one file at a time, as one matrix product
  (on the GPU where the driver has one). The driver holds one block, one shard and their similarity
  matrix, never the job's embeddings.
- faiss (a CPU driver, FAISS_MIN_IMAGES images or more): each shard's file is read once, added to an
  exact inner-product index and queried against it. The driver holds the index (every unit vector,
  n × d float32) and every image's id, and one shard's file.
Pairs above the threshold join groups (union-find over the marked rows only). A group is numbered by
its first member in shard order; an image's nearest match is the most similar one, the first in shard
order among equals.

`duplicates.parquet` has one row per marked image (id, shard_id, position, group, nearest: the id of
its most similar image, cosine: their similarity); its schema metadata records what it was computed
from (the committed shards and the threshold), so a re-run with nothing new reuses it.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import torch

from imagemill.core.evaluation_results import DuplicatePair, NearDuplicatesResult
from imagemill.core.layout import DUPLICATES, OutputLayout
from imagemill.core.write_gate import OwnedOutput
from imagemill.evaluation.distribution_metrics import unit_rows
from imagemill.evaluation.embedding_passes import read_shard_embeddings
from imagemill.evaluation.metric import StateKind, StreamedShards, StreamsShards
from imagemill.evaluation.similarity_search import FaissIndex, Method, close_pairs, search_method
from imagemill.evaluation.stamped import read_stamped, write_stamped

BLOCK_ROWS = 4096
EXAMPLE_PAIRS = 5  # pairs shown in the report
Key = tuple[str, int]  # (shard id, position)


class _Groups:
    """Union-find over the rows that have a near-duplicate, with each row's nearest match."""

    def __init__(self) -> None:
        self.parent: dict[Key, Key] = {}
        self.ids: dict[Key, str] = {}
        self.nearest: dict[Key, tuple[float, Key, str]] = {}  # (cosine, its key, its id)

    def root(self, key: Key) -> Key:
        while self.parent[key] != key:
            self.parent[key] = self.parent[self.parent[key]]
            key = self.parent[key]
        return key

    def join(self, a: Key, a_id: str, b: Key, b_id: str, cosine: float) -> None:
        for key, own, other, other_id in ((a, a_id, b, b_id), (b, b_id, a, a_id)):
            self.parent.setdefault(key, key)
            self.ids[key] = own
            best = self.nearest.get(key)
            if best is None or (-cosine, other) < (-best[0], best[1]):  # the same whatever the order
                self.nearest[key] = (cosine, other, other_id)
        ra, rb = self.root(a), self.root(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # the root is the group's first member

    def table(self) -> pa.Table:
        keys = sorted(self.parent)
        numbers: dict[Key, int] = {}
        for key in keys:
            numbers.setdefault(self.root(key), len(numbers))
        return pa.table(
            {
                "id": pa.array([self.ids[key] for key in keys], pa.string()),
                "shard_id": pa.array([key[0] for key in keys], pa.string()),
                "position": pa.array([key[1] for key in keys], pa.int64()),
                "group": pa.array([numbers[self.root(key)] for key in keys], pa.int64()),
                "nearest": pa.array([self.nearest[key][2] for key in keys], pa.string()),
                "cosine": pa.array([round(self.nearest[key][0], 6) for key in keys], pa.float64()),
            }
        )


def _blocks(
    output: OutputLayout, shard_ids: list[str]
) -> Iterator[tuple[int, list[tuple[str, list[str], np.ndarray]]]]:
    """(index of the block's first shard, its shards' (shard id, ids, unit embeddings)), about
    BLOCK_ROWS rows at a time."""
    block: list[tuple[str, list[str], np.ndarray]] = []
    start = 0
    for index, shard_id in enumerate(shard_ids):
        for _, ids, _, vectors in read_shard_embeddings(output, [shard_id]):
            block.append((shard_id, ids, unit_rows(vectors)))
        if sum(len(ids) for _, ids, _ in block) >= BLOCK_ROWS or index == len(shard_ids) - 1:
            if block:
                yield start, block
            block, start = [], index + 1


def _compare(
    groups: _Groups,
    left: tuple[str, list[str], np.ndarray],
    right: tuple[str, list[str], np.ndarray],
    threshold: float,
    device: str,
) -> None:
    (a_shard, a_ids, a), (b_shard, b_ids, b) = left, right
    for i, j, cosine in close_pairs(a, b, threshold, device):
        if a_shard != b_shard or i < j:  # each pair once, no image with itself
            groups.join((a_shard, i), a_ids[i], (b_shard, j), b_ids[j], cosine)


def _join_blockwise(groups: _Groups, output: OutputLayout, shard_ids: list[str], threshold: float) -> None:
    """The torch way: blocks against themselves and every later shard (module docstring)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for start, block in _blocks(output, shard_ids):
        in_block = {shard_id for shard_id, _, _ in block}
        for index, left in enumerate(block):
            for right in block[index:]:
                _compare(groups, left, right, threshold, device)
        later = [shard_id for shard_id in shard_ids[start:] if shard_id not in in_block]
        for shard_id, ids, _, vectors in read_shard_embeddings(output, later):
            for left in block:
                _compare(groups, left, (shard_id, ids, unit_rows(vectors)), threshold, device)


def _join_indexed(groups: _Groups, output: OutputLayout, shard_ids: list[str], threshold: float) -> None:
    """The faiss way: each shard added to the index, then queried against it (module docstring)."""
    index: FaissIndex | None = None
    starts: list[int] = []  # each indexed shard's first index row
    shards: list[tuple[str, list[str]]] = []  # each indexed shard's id and image ids
    for shard_id, ids, _, vectors in read_shard_embeddings(output, shard_ids):
        if not ids:
            continue
        unit = unit_rows(vectors)
        index = index or FaissIndex(unit.shape[1])
        start = index.add(unit)
        starts.append(start)
        shards.append((shard_id, ids))
        for i, row, cosine in index.within(unit, threshold):
            if row >= start + i:  # each pair once, found from its later image
                continue
            which = bisect_right(starts, row) - 1
            other_shard, other_ids = shards[which]
            position = row - starts[which]
            groups.join((shard_id, i), ids[i], (other_shard, position), other_ids[position], cosine)


def find_duplicates(
    output: OutputLayout, shard_ids: list[str], threshold: float, method: Method = "torch"
) -> pa.Table:
    """The marked images of these shards (see the module docstring)."""
    shard_ids = sorted(shard_ids)
    groups = _Groups()
    (_join_indexed if method == "faiss" else _join_blockwise)(groups, output, shard_ids, threshold)
    return groups.table()


@dataclass(frozen=True)
class NearDuplicates(StreamsShards):
    """The job's near-duplicates as a metric (imagemill.evaluation.metric): its state is the set of
    shards (StreamedShards); `compute` reads `duplicates.parquet` when it
    was made from the same basis (those shards and the threshold), else finds them and writes it."""

    state: ClassVar[StateKind] = "shards"
    output: OwnedOutput  # written through the gate (core/write_gate.py)
    threshold: float
    streamed: StreamedShards = StreamedShards()

    def compute(self) -> NearDuplicatesResult:
        basis = {"shards": self.streamed.shards, "threshold": self.threshold}
        table = read_stamped(self.output.layout, DUPLICATES, basis)
        if table is None:
            table = find_duplicates(
                self.output.layout,
                list(self.streamed.shards),
                self.threshold,
                search_method(self.streamed.images),
            )
            write_stamped(self.output, DUPLICATES, table, basis)
        firsts: dict[int, dict[str, Any]] = {}
        for row in table.to_pylist():
            firsts.setdefault(row["group"], row)
        return NearDuplicatesResult(
            threshold=self.threshold,
            file=DUPLICATES,
            images=table.num_rows,
            groups=len(firsts),
            examples=[
                DuplicatePair(id=row["id"], nearest=row["nearest"], cosine=row["cosine"])
                for row in list(firsts.values())[:EXAMPLE_PAIRS]
            ],
        )
