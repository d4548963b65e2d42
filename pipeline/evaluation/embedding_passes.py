"""Streaming passes over the job's embedding files, one shard file in memory at a time.

`read_shard_embeddings` yields each committed shard's (ids, labels, embeddings); `SeededSample` keeps a
fixed-size sample of the vectors streamed through it. The sample is the k items with the smallest hash
of (seed, shard id, position): it depends on the seed and the items alone, not on the order shards are
read in, so KID and diversity come out the same on every run.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Iterator

import numpy as np
import pyarrow.parquet as pq

from imagemill.core.features import embedding_matrix
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
    """Up to `size` vectors: those with the smallest priorities of all that were offered."""

    def __init__(self, size: int, seed: int):
        self.size = size
        self.seed = seed
        self._heap: list[tuple[int, int, np.ndarray]] = []  # (-priority, tiebreak, vector): a max-heap

    def offer(self, shard_id: str, vectors: np.ndarray) -> None:
        for position, vector in enumerate(vectors):
            item = (-_priority(self.seed, shard_id, position), position, vector)
            if len(self._heap) < self.size:
                heapq.heappush(self._heap, item)
            elif item[0] > self._heap[0][0]:
                heapq.heapreplace(self._heap, item)

    def vectors(self) -> np.ndarray:
        """The sample in priority order (so the same sample is the same matrix), (n, d)."""
        ordered = sorted(self._heap, key=lambda item: (-item[0], item[1]))
        return np.array([vector for _, _, vector in ordered])

    def __len__(self) -> int:
        return len(self._heap)
