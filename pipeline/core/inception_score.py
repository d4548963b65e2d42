"""The Inception Score from sums that merge across shards (`evaluation.features: inception`).

IS = exp(E_x KL(p(y|x) || p(y))), with p(y) the mean of p(y|x) over the images. Since
KL(p(y|x) || p(y)) = sum_y p log p - sum_y p(y|x) log p(y), its mean over n images is
(sum over images of sum_y p log p) / n - sum_y p(y) log p(y), and p(y) = (sum of p(y|x)) / n.
So a set's IS needs only n, the sum of p(y|x) and the sum of sum_y p log p: exact sums, added across
shards (and per label) in any grouping.

torch-fidelity and torchmetrics shuffle the images and report the mean and spread of IS over 10
splits; a split's score needs its own p(y), so that is not mergeable. imagemill reports IS over all
the images at once: torchmetrics' `InceptionScore(splits=1)`. It is computed from the 1008 unbiased
logits (`fc` without its bias), as both libraries do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Self

import numpy as np

SPLITS = 1  # what the job record says IS was computed over


@dataclass
class ClassSums:
    """count, sum of p(y|x) and sum of sum_y p log p over a set of images, in float64."""

    count: int
    probability: np.ndarray  # (classes,)
    p_log_p: float

    @classmethod
    def of_logits(cls, logits: np.ndarray) -> Self:
        """The sums of (n, classes) logits' softmax."""
        values = logits.astype(np.float64)
        log_p = values - values.max(axis=1, keepdims=True)
        log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
        p = np.exp(log_p)
        return cls(len(values), p.sum(axis=0), float((p * log_p).sum()))

    def merge(self, other: ClassSums) -> None:
        self.count += other.count
        self.probability += other.probability
        self.p_log_p += other.p_log_p

    def inception_score(self) -> float | None:
        """exp(E_x KL(p(y|x) || p(y))); None for no image."""
        if self.count == 0:
            return None
        marginal = self.probability / self.count
        present = marginal[marginal > 0]  # 0 log 0 = 0
        return float(np.exp(self.p_log_p / self.count - (present * np.log(present)).sum()))
