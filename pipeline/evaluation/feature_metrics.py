"""The metrics computed from the shards' merged feature sums (imagemill.core.features): FID against the
reference and the Inception Score. No embedding file is read; a state is exact sums per label.

Per label, a label's images are compared with that label's reference images where the reference is
labelled (`reference_label_column`; a label with fewer than 2 has no FID), else the whole reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar

import numpy as np

from imagemill.core.evaluation_results import FrechetDistanceResult, InceptionScoreResult
from imagemill.core.features import JOB_WIDE, FeatureSums, merge_sums
from imagemill.core.inception_score import SPLITS, ClassSums
from imagemill.evaluation.distribution_metrics import frechet_distance
from imagemill.evaluation.metric import ShardEvaluation, StateKind
from imagemill.evaluation.reference import Reference


@dataclass(frozen=True)
class FrechetDistance:
    """FID job-wide and per label, from means and covariances of the merged sums; None without a
    reference."""

    state: ClassVar[StateKind] = "sums"
    reference: Reference | None
    sums: dict[str | None, FeatureSums] = field(default_factory=dict)

    def partial(self, shard: ShardEvaluation) -> FrechetDistance:
        return replace(self, sums=shard.sums)

    def merge(self, other: FrechetDistance) -> FrechetDistance:
        return replace(self, sums=merge_sums([self.sums, other.sums]))

    def compute(self) -> FrechetDistanceResult | None:
        if self.reference is None:
            return None
        fid = {
            label: frechet_distance(*sums.mean_cov(), real.mean, real.cov)
            for label, sums in self.sums.items()
            if sums.count >= 2 and (real := self.reference.of_label(label)) is not None
        }
        return FrechetDistanceResult.of(fid)


@dataclass(frozen=True)
class InceptionScore:
    """IS job-wide and per label over all their images at once (splits=1), from the merged class sums
    of a classifier head (`features: inception`). None without one, or when some shard's images have
    no class sums (a shard committed without the head): a partial score would read as the job's."""

    state: ClassVar[StateKind] = "sums"
    images: dict[str | None, int] = field(default_factory=dict)
    classes: dict[str | None, ClassSums] = field(default_factory=dict)

    def partial(self, shard: ShardEvaluation) -> InceptionScore:
        return InceptionScore(
            images={label: sums.count for label, sums in shard.sums.items()},
            classes={label: sums.classes for label, sums in shard.sums.items() if sums.classes is not None},
        )

    def merge(self, other: InceptionScore) -> InceptionScore:
        images = {
            label: self.images.get(label, 0) + other.images.get(label, 0)
            for label in self.images | other.images
        }
        classes = {}
        for label in self.classes.keys() | other.classes.keys():
            parts = [part for part in (self.classes.get(label), other.classes.get(label)) if part is not None]
            classes[label] = ClassSums(0, np.zeros_like(parts[0].probability), 0.0)
            for part in parts:
                classes[label].merge(part)
        return InceptionScore(images, classes)

    def compute(self) -> InceptionScoreResult | None:
        scores = {
            label: sums.inception_score()
            for label, sums in self.classes.items()
            if sums.count == self.images.get(label)
        }
        if scores.get(JOB_WIDE) is None:
            return None
        return InceptionScoreResult.of(scores, splits=SPLITS)
