"""The evaluation's per-shard files, declared once for the actors that write them and the driver that
reads them (the `evaluation:` section; workers/stages/evaluation.py embeds,
imagemill.evaluation.post_pass merges).

- `embeddings/<shard_id>.parquet`: one row per written image, in shard order: `id`, `label` (null
  without a label column) and `embedding` (float16, the feature model's image embedding). Later
  passes (KID's sample, diversity, near-duplicates) read these, one shard at a time, and no image.
- `feature_stats/<shard_id>.parquet`: the sufficient statistics of the shard's float32 features, in
  float64: count, sum and sum of outer products, job-wide (label null) and per label. Sums add up
  across shards, so the driver gets the job's mean and covariance (FID) without reading any
  embedding file. A 768-d sum of outer products is 590k numbers, so it is a file of its own rather
  than part of the shard's JSON stats; it is written before the commit, so a committed shard has it.
  With a classifier head (`features: inception`) it also holds the Inception Score's sums
  (imagemill.core.inception_score): `class_probability` and `p_log_p`, columns absent otherwise (older
  files read as without them).

Both are Parquet (written by `parquet_bytes`): byte-identical for the same features on every run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Self

import numpy as np
import pyarrow as pa

from imagemill.core.inception_score import ClassSums


@dataclass
class FeatureSums:
    """count, sum and sum of outer products of a set of feature vectors, in float64."""

    count: int
    sum: np.ndarray  # (d,)
    outer: np.ndarray  # (d, d)
    classes: ClassSums | None = None  # the Inception Score's sums, with a classifier head

    @classmethod
    def empty(cls, dim: int) -> Self:
        return cls(0, np.zeros(dim), np.zeros((dim, dim)))

    def add(self, features: np.ndarray) -> None:
        """Add (n, d) feature vectors."""
        values = features.astype(np.float64)
        self.count += len(values)
        self.sum += values.sum(axis=0)
        self.outer += values.T @ values

    def merge(self, other: FeatureSums) -> None:
        self.count += other.count
        self.sum += other.sum
        self.outer += other.outer
        if other.classes is not None:
            if self.classes is None:
                self.classes = ClassSums(0, np.zeros_like(other.classes.probability), 0.0)
            self.classes.merge(other.classes)

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """The mean and the unbiased covariance (n - 1), as clean-fid and torchmetrics compute them."""
        mean = self.sum / self.count
        cov = (self.outer - self.count * np.outer(mean, mean)) / (self.count - 1)
        return mean, cov


JOB_WIDE: str | None = None  # the label key of the job-wide sums


def sums_table(sums: dict[str | None, FeatureSums]) -> pa.Table:
    """A shard's `feature_stats` file: one row per label (null: job-wide), in label order."""
    keys = sorted(sums, key=lambda label: (label is not None, label or ""))
    columns = {
        "label": pa.array(keys, pa.string()),
        "count": pa.array([sums[key].count for key in keys], pa.int64()),
        "sum": _float_lists([sums[key].sum for key in keys]),
        "outer": _float_lists([sums[key].outer.ravel() for key in keys]),
    }
    classes = [sums[key].classes for key in keys]
    if any(classes):
        columns["class_probability"] = pa.array(
            [c.probability.tolist() if c else None for c in classes], pa.list_(pa.float64())
        )
        columns["p_log_p"] = pa.array([c.p_log_p if c else None for c in classes], pa.float64())
    return pa.table(columns)


def _float_lists(rows: list[np.ndarray]) -> pa.ListArray:
    """float64 list cells from numpy rows without a Python float per value (an Inception-sized
    outer-product sum is 4M values per label)."""
    offsets = np.concatenate([[0], np.cumsum([len(row) for row in rows])]).astype(np.int32)
    values = np.concatenate(rows).astype(np.float64) if rows else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def _float_rows(column: pa.ChunkedArray) -> list[np.ndarray | None]:
    """`_float_lists` read back: each cell as a float64 array (None for a null cell)."""
    cells = column.combine_chunks()
    return [np.asarray(cell.values, dtype=np.float64) if cell.is_valid else None for cell in cells]


def sums_from_table(table: pa.Table) -> dict[str | None, FeatureSums]:
    """What `sums_table` wrote."""
    sums = {}
    names = table.column_names
    totals, outers = _float_rows(table.column("sum")), _float_rows(table.column("outer"))
    probabilities = _float_rows(table.column("class_probability")) if "class_probability" in names else None
    p_log_p = table.column("p_log_p").to_pylist() if "p_log_p" in names else None
    for index, (label, count) in enumerate(
        zip(table.column("label").to_pylist(), table.column("count").to_pylist(), strict=True)
    ):
        total = totals[index]
        outer = outers[index].reshape(len(total), len(total))
        classes = None
        if probabilities is not None and probabilities[index] is not None:
            classes = ClassSums(count, probabilities[index], p_log_p[index])
        sums[label] = FeatureSums(count, total, outer, classes)
    return sums


def merge_sums(shards: list[dict[str | None, FeatureSums]]) -> dict[str | None, FeatureSums]:
    """The job's sums per label from the shards' (each added in the order given)."""
    merged: dict[str | None, FeatureSums] = {}
    for shard in shards:
        for label, sums in shard.items():
            if label not in merged:
                merged[label] = FeatureSums.empty(len(sums.sum))
            merged[label].merge(sums)
    return merged


def embeddings_table(
    ids: list[str], labels: list[str | None], features: np.ndarray, dtype: type = np.float16
) -> pa.Table:
    """A shard's `embeddings` file: (n, d) features, stored as float16 (the reference's cache: float32)."""
    values = pa.array(features.astype(dtype).ravel())
    dim = features.shape[1] if features.ndim == 2 else 0
    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "label": pa.array(labels, pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(values, dim),
        }
    )


def embedding_matrix(table: pa.Table) -> np.ndarray:
    """The (n, d) float32 embeddings of an `embeddings` table."""
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    return column.values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
