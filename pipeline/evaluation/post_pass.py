"""The evaluation post-pass (`evaluation:`), run by the driver once the shards are committed: what the
job record and the report show about the dataset as a whole.

- FID against the reference from the merged feature sums (imagemill.core.features): no embedding file read;
- KID from a seeded sample of `kid_sample` embeddings per side (embedding files streamed), and per
  label from the label's diversity sample;
- diversity: the mean pairwise cosine distance of a seeded sample of `diversity_sample` embeddings,
  job-wide and per label (the `label` of the embeddings files: the job's label column);
- near-duplicates (imagemill.evaluation.near_duplicates), and with `leakage` the images close to a reference
  image (imagemill.evaluation.leakage), each reused when nothing changed;
- the CLIP score distribution per label (imagemill.evaluation.score_distribution), when the job is scored.

Per label, a label's images are compared with that label's reference images where the reference is
labelled (`reference_label_column`; a label with fewer than 2 has no FID/KID), else the whole reference.

The Inception Score needs a classifier head: with `features: inception` it comes from the merged class
sums (imagemill.core.inception_score; over all images at once, splits=1), job-wide and per label; with
CLIP or pixel features it is null.
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow.parquet as pq
import torch

from imagemill.core.features import JOB_WIDE, FeatureSums, merge_sums, sums_from_table
from imagemill.core.inception_score import SPLITS
from imagemill.core.layout import OutputLayout
from imagemill.core.records import ShardStats
from imagemill.core.spec import JobSpec
from imagemill.evaluation.distribution_metrics import (
    frechet_distance,
    kernel_inception_distance,
    mean_pairwise_cosine_distance,
)
from imagemill.evaluation.embedding_passes import SeededSample, read_shard_embeddings
from imagemill.evaluation.leakage import leakage
from imagemill.evaluation.near_duplicates import near_duplicates
from imagemill.evaluation.reference import Reference, load_reference
from imagemill.evaluation.score_distribution import clip_score_distribution

log = logging.getLogger(__name__)
REFERENCE_SHARD = "\0reference"  # the reference's rows in the seeded sample's hash


def merged_feature_sums(output: OutputLayout, shard_ids: list[str]) -> dict[str | None, FeatureSums]:
    """The job's feature sums per label (None: job-wide), from the shards' feature_stats files."""
    shards = []
    for shard_id in sorted(shard_ids):
        try:
            with output.fs.open(output.path(OutputLayout.feature_stats_path(shard_id)), "rb") as f:
                shards.append(sums_from_table(pq.read_table(f)))
        except FileNotFoundError:  # committed before `evaluation:` was added: nothing to merge
            continue
    return merge_sums(shards)


def evaluate(spec: JobSpec, output: OutputLayout, committed: dict[str, ShardStats]) -> dict[str, Any]:
    """The dataset's numbers, for `_job.json`'s `evaluation` and the report's dataset section."""
    settings = spec.evaluation
    assert settings is not None
    shard_ids = sorted(committed)
    sums = merged_feature_sums(output, shard_ids)
    kid_sample = SeededSample(settings.kid_sample, settings.seed)
    diversity: dict[str | None, SeededSample] = {}
    for shard_id, _, labels, vectors in read_shard_embeddings(output, shard_ids):
        kid_sample.offer(shard_id, vectors)
        for label in (JOB_WIDE, *sorted({label for label in labels if label is not None})):
            rows = [i for i, value in enumerate(labels) if label is None or value == label]
            diversity.setdefault(label, SeededSample(settings.diversity_sample, settings.seed))
            diversity[label].offer(shard_id, vectors[rows])
    images = sums[JOB_WIDE].count if JOB_WIDE in sums else 0
    shards = {shard_id: stats.finished_at for shard_id, stats in committed.items()}
    result: dict[str, Any] = {
        "images": images,
        "diversity": _per_label(
            {label: mean_pairwise_cosine_distance(s.vectors()) for label, s in diversity.items()}
        ),
        "near_duplicates": near_duplicates(
            output,
            {"shards": shards, "threshold": settings.duplicate_threshold},
            shard_ids,
            settings.duplicate_threshold,
            images,
        ),
        "inception_score": _inception_scores(sums),
    }
    scores = clip_score_distribution(output, shard_ids, spec.label_column()) if spec.scoring else {}
    result["clip_score"] = _per_label(scores) if scores else None  # None: scoring is off
    if settings.reference is not None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        reference = load_reference(settings, output, device)
        samples = {**diversity, JOB_WIDE: kid_sample}
        result.update(_against_reference(reference, sums, samples, settings.seed))
        if settings.leakage:
            basis = {
                "shards": shards,
                "threshold": settings.duplicate_threshold,
                "reference": settings.reference,
            }
            result["leakage"] = leakage(
                output, basis, shard_ids, reference, settings.duplicate_threshold, images
            )
    return result


def _against_reference(
    reference: Reference,
    sums: dict[str | None, FeatureSums],
    samples: dict[str | None, SeededSample],
    seed: int,
) -> dict[str, Any]:
    """FID and KID, job-wide and per label, against the reference (a label's own where it is labelled);
    KID only from the reference's features (precomputed statistics have none), with two or more images
    on each side."""
    references = {label: reference.of_label(label) for label in sums.keys() | samples.keys()}
    fid = {
        label: frechet_distance(*label_sums.mean_cov(), real.mean, real.cov)
        for label, label_sums in sums.items()
        if label_sums.count >= 2 and (real := references[label]) is not None
    }
    kid = {}
    for label, sample in samples.items():
        real_features = getattr(references[label], "features", None)
        if real_features is not None and len(sample) >= 2:
            real = SeededSample(sample.size, seed)
            real.offer(REFERENCE_SHARD, real_features)
            kid[label] = kernel_inception_distance(sample.vectors(), real.vectors())
    return {"fid": _per_label(fid), "kid": _per_label(kid)}


def _inception_scores(sums: dict[str | None, FeatureSums]) -> dict[str, Any] | None:
    """IS job-wide and per label, over all their images at once; None without a classifier head (or
    when some committed shard has no class sums)."""
    scores = {label: label_sums.inception_score() for label, label_sums in sums.items()}
    if scores.get(JOB_WIDE) is None:
        return None
    return {**_per_label(scores), "splits": SPLITS}


def _per_label(values: dict[str | None, Any]) -> dict[str, Any]:
    """{"all": job-wide, "per_label": {label: value}} as the job record holds it."""
    return {
        "all": values.get(JOB_WIDE),
        "per_label": {
            label: value for label, value in sorted((k, v) for k, v in values.items() if k is not None)
        },
    }
