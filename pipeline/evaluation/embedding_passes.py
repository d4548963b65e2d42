"""Streaming passes over the job's embedding files, one shard file in memory at a time.

`read_shard_embeddings` yields each committed shard's (ids, labels, embeddings); `SeededSample` keeps a
fixed-size sample of the vectors streamed through it. The sample is the k items with the smallest hash
of (seed, shard id, position): it depends on the seed and the items alone, not on the order shards are
read in, so KID and diversity come out the same on every run; samples of disjoint shards merge
(`SeededSample.merge`), so they are the state of mergeable metrics (imagemill.evaluation.metric).
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow.parquet as pq

from imagemill.core.features import JOB_WIDE, embedding_matrix
from imagemill.core.layout import OutputLayout


def read_shard_embeddings(
    output: OutputLayout, shard_ids: list[str]
) -> Iterator[tuple[str, list[str], list[str | None], np.ndarray]]:
    """(shard id, ids, labels, (n, d) float32 embeddings) of each shard, in the order given; a shard
    with no embeddings file (committed before `evaluation:` was added) is skipped."""
    for shard_id in shard_ids:
        path = output.path(OutputLayout.embeddings_path(shard_id))
        try:
            with output.fs.open(path, "rb") as f:
                table = pq.read_table(f)
        except FileNotFoundError:
            continue
        yield (
            shard_id,
            table.column("id").to_pylist(),
            table.column("label").to_pylist(),
            embedding_matrix(table),
        )


def _priority(seed: int, shard_id: str, position: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}\0{shard_id}\0{position}".encode()).digest()[:8], "big")


class SeededSample:
    """Up to `size` vectors: those with the smallest priorities of all that were offered.

    A bottom-k sample, so it merges: the sample of two disjoint sets of shards is the `size` smallest
    of their two samples, whatever the grouping or order (`merge`), the same as offering every shard
    to one sample. Each kept vector is copied, so a sampled row does not keep its shard's matrix alive.
    """

    def __init__(self, size: int, seed: int):
        self.size = size
        self.seed = seed
        # (-priority, shard id, position, vector): a max-heap on the priority; (shard id, position)
        # names the item, so no two items compare equal (no vector is compared)
        self._heap: list[tuple[int, str, int, np.ndarray]] = []

    def offer(self, shard_id: str, vectors: np.ndarray) -> None:
        for position, vector in enumerate(vectors):
            item = (-_priority(self.seed, shard_id, position), shard_id, position, vector)
            if len(self._heap) < self.size:
                heapq.heappush(self._heap, (*item[:3], vector.copy()))
            elif item[:3] > self._heap[0][:3]:
                heapq.heapreplace(self._heap, (*item[:3], vector.copy()))

    def merge(self, other: SeededSample) -> SeededSample:
        """A new sample of both samples' shards (which must be disjoint), with the same size and seed."""
        assert (self.size, self.seed) == (other.size, other.seed), "samples of different settings"
        merged = SeededSample(self.size, self.seed)
        merged._heap = heapq.nlargest(self.size, self._heap + other._heap, key=lambda item: item[:3])
        heapq.heapify(merged._heap)
        return merged

    def vectors(self) -> np.ndarray:
        """The sample in priority order (so the same sample is the same matrix), (n, d)."""
        ordered = sorted(self._heap, key=lambda item: (-item[0], item[1], item[2]))
        return np.array([item[3] for item in ordered])

    def __len__(self) -> int:
        return len(self._heap)


@dataclass(frozen=True)
class LabelledSamples:
    """A seeded sample of the job's vectors (`job_size`) and one of each label's (`label_size`), keyed
    by label (JOB_WIDE: the job's). A label's sample is seeded by the vectors' positions among the
    shard's rows of that label."""

    job_size: int
    label_size: int
    seed: int
    samples: dict[str | None, SeededSample] = field(default_factory=dict)

    def of_shard(self, shard_id: str, labels: list[str | None], vectors: np.ndarray) -> LabelledSamples:
        """These settings' samples of one shard's vectors."""
        samples = {}
        for label in (JOB_WIDE, *sorted({label for label in labels if label is not None})):
            rows = [i for i, value in enumerate(labels) if label is None or value == label]
            samples[label] = SeededSample(self.job_size if label is JOB_WIDE else self.label_size, self.seed)
            samples[label].offer(shard_id, vectors[rows])
        return replace(self, samples=samples)

    def merge(self, other: LabelledSamples) -> LabelledSamples:
        """Both sets of samples merged label by label (see SeededSample.merge)."""
        samples = dict(self.samples)
        for label, sample in other.samples.items():
            samples[label] = samples[label].merge(sample) if label in samples else sample
        return replace(self, samples=samples)
