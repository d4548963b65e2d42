"""Pairs of unit vectors whose cosine similarity is at least a threshold, found exactly in one of two
ways (the evaluation's near-duplicates and leakage passes use both):

- `torch`: one matrix product per pair of blocks, on the GPU where the driver has one;
- `faiss`: an exact inner-product index (faiss `IndexFlatIP`, every pair compared, no approximation)
  that vectors are added to a batch at a time and queried with `range_search`. On a CPU driver it
  reads each embedding file once where the blockwise product re-reads the later shards per block,
  at the price of holding every indexed vector (n × d float32).

Both only *find candidates* (cosine within TOLERANCE below the threshold, in float32); each candidate's
cosine is then computed again in float64 from the same unit vectors and decides. So the two ways give
the same pairs with the same cosines, whatever order their float32 sums took.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

FAISS_MIN_IMAGES = 50_000  # a CPU driver uses faiss from this many images on
TOLERANCE = 1e-4  # well above float32 rounding of a 768-d dot product, well below any useful threshold
Method = Literal["torch", "faiss"]
Pair = tuple[int, int, float]  # (row of the queries, row of the other side, float64 cosine)


def search_method(images: int) -> Method:
    """Exact on the device, or faiss on a CPU driver once the job is large (the blockwise product's
    re-reading of files then dominates); torch on a CPU driver without faiss installed."""
    if torch.cuda.is_available() or images < FAISS_MIN_IMAGES:
        return "torch"
    try:
        import faiss  # noqa: F401  (the optional extra `faiss`)
    except ImportError:
        return "torch"
    return "faiss"


def _decided(
    a: np.ndarray, b: np.ndarray | dict[int, np.ndarray], candidates: list[tuple[int, int]], threshold: float
) -> list[Pair]:
    """The candidates whose float64 cosine (rows of a and b) is at or above the threshold."""
    pairs = []
    for i, j in candidates:
        cosine = float(np.dot(a[i].astype(np.float64), b[j].astype(np.float64)))
        if cosine >= threshold:
            pairs.append((i, j, cosine))
    return pairs


def close_pairs(a: np.ndarray, b: np.ndarray, threshold: float, device: str) -> list[Pair]:
    """The pairs of rows of unit-vector matrices a (n, d) and b (m, d) at or above the threshold, by
    one matrix product on `device`."""
    if not len(a) or not len(b):
        return []
    cosines = torch.from_numpy(a).to(device) @ torch.from_numpy(b).to(device).T
    candidates = (cosines >= threshold - TOLERANCE).nonzero().tolist()
    return _decided(a, b, candidates, threshold)


class FaissIndex:
    """An exact inner-product index of unit vectors, added a batch at a time; it holds them all."""

    def __init__(self, dim: int):
        import faiss

        self.index = faiss.IndexFlatIP(dim)

    def add(self, vectors: np.ndarray) -> int:
        """Add (n, d) unit vectors; returns the index row of the first."""
        start = self.index.ntotal
        self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        return start

    def within(self, queries: np.ndarray, threshold: float) -> list[Pair]:
        """The (query row, index row, cosine) pairs at or above the threshold."""
        if not len(queries) or not self.index.ntotal:
            return []
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        limits, _, rows = self.index.range_search(queries, threshold - TOLERANCE)
        candidates = [(i, int(j)) for i in range(len(queries)) for j in rows[limits[i] : limits[i + 1]]]
        stored = {j: self.index.reconstruct(j) for _, j in candidates}  # only the candidates' vectors
        return _decided(queries, stored, candidates, threshold)
