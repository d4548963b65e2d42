"""The metrics computed from seeded samples of the shards' embeddings (imagemill.evaluation.embedding_passes):
KID against the reference and diversity. A state is a bottom-k sample per label, which merges to the
same sample whatever the grouping, so the numbers are the same on every run.

- KID: the job's sample of `kid_sample` embeddings, and each label's of `diversity_sample`, against
  an equal-sized seeded sample of the reference's features (a label's own where the reference is
  labelled); only from the reference's features (precomputed statistics have none), with two or
  more images on each side.
- diversity: the mean pairwise cosine distance of a sample of `diversity_sample`, job-wide and per
  label.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from imagemill.core.evaluation_results import DiversityResult, KernelDistanceResult
from imagemill.evaluation.distribution_metrics import kernel_inception_distance, mean_pairwise_cosine_distance
from imagemill.evaluation.embedding_passes import LabelledSamples, SeededSample
from imagemill.evaluation.metric import ShardEvaluation, StateKind
from imagemill.evaluation.reference import Reference

REFERENCE_SHARD = "\0reference"  # the reference's rows in the seeded sample's hash


def _partial(samples: LabelledSamples, shard: ShardEvaluation) -> LabelledSamples:
    if shard.vectors is None:
        return replace(samples, samples={})
    return samples.of_shard(shard.shard_id, shard.labels, shard.vectors)


@dataclass(frozen=True)
class KernelDistance:
    """KID job-wide and per label (module docstring); None without a reference."""

    state: ClassVar[StateKind] = "sample"
    reference: Reference | None
    samples: LabelledSamples

    def partial(self, shard: ShardEvaluation) -> KernelDistance:
        return replace(self, samples=_partial(self.samples, shard))

    def merge(self, other: KernelDistance) -> KernelDistance:
        return replace(self, samples=self.samples.merge(other.samples))

    def compute(self) -> KernelDistanceResult | None:
        if self.reference is None:
            return None
        kid = {}
        for label, sample in self.samples.samples.items():
            real_features = getattr(self.reference.of_label(label), "features", None)
            if real_features is not None and len(sample) >= 2:
                real = SeededSample(sample.size, sample.seed)
                real.offer(REFERENCE_SHARD, real_features)
                kid[label] = kernel_inception_distance(sample.vectors(), real.vectors())
        return KernelDistanceResult.of(kid)


@dataclass(frozen=True)
class Diversity:
    """The mean pairwise cosine distance of each sample (None for a label with one image)."""

    state: ClassVar[StateKind] = "sample"
    samples: LabelledSamples

    def partial(self, shard: ShardEvaluation) -> Diversity:
        return replace(self, samples=_partial(self.samples, shard))

    def merge(self, other: Diversity) -> Diversity:
        return replace(self, samples=self.samples.merge(other.samples))

    def compute(self) -> DiversityResult:
        samples = self.samples.samples
        return DiversityResult.of(
            {label: mean_pairwise_cosine_distance(sample.vectors()) for label, sample in samples.items()}
        )
