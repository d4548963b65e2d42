"""The set-level numbers of the evaluation, from features: FID, KID and diversity.

FID and KID follow torchmetrics' formulas (`FrechetInceptionDistance`, `KernelInceptionDistance`), so
with the same feature model they give its numbers (tests/test_evaluation.py compares them):
- FID = |mu1 - mu2|² + tr(S1) + tr(S2) - 2 Σ sqrt(eigenvalues(S1 S2)), from means and covariances;
- KID = the unbiased MMD² with the polynomial kernel (x·y / d + 1)³, here on one seeded sample per
  side (torchmetrics with `subsets=1` and `subset_size` = the sample size).
"""

from __future__ import annotations

import numpy as np


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    diff = float(np.square(mu1 - mu2).sum())
    root_trace = np.sqrt(np.linalg.eigvals(cov1 @ cov2).astype(np.complex128)).real.sum()
    return diff + float(np.trace(cov1) + np.trace(cov2)) - 2 * float(root_trace)


def _polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def kernel_inception_distance(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD² between feature samples x (m, d) and y (n, d), m, n ≥ 2."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    m, n = len(x), len(y)
    k_xx, k_yy = _polynomial_kernel(x, x), _polynomial_kernel(y, y)
    within_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    within_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(within_x + within_y - 2 * _polynomial_kernel(x, y).sum() / (m * n))


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Each row scaled to length 1 (a zero row stays zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms == 0, 1, norms)


def mean_pairwise_cosine_distance(x: np.ndarray) -> float | None:
    """The mean of 1 - cos over the distinct pairs of rows; None for fewer than two rows."""
    n = len(x)
    if n < 2:
        return None
    unit = unit_rows(x.astype(np.float64))
    cosines = unit @ unit.T
    return float(1 - (cosines.sum() - np.trace(cosines)) / (n * (n - 1)))
