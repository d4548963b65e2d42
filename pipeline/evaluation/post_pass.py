"""The evaluation post-pass (`evaluation:`), run by the driver once the shards are committed: what the
job record and the report show about the dataset as a whole.

- FID against the reference from the merged feature sums (imagemill.core.features): no embedding file read;
- KID from a seeded sample of `kid_sample` embeddings per side (embedding files streamed), and per
  label from the label's diversity sample;
- diversity: the mean pairwise cosine distance of a seeded sample of `diversity_sample` embeddings,
  job-wide and per label (the `label` of the embeddings files: the job's label column);
- near-duplicates (imagemill.evaluation.near_duplicates), and with `leakage` the images close to a reference
  image (imagemill.evaluation.leakage), each reused when nothing changed;
- the CLIP score distribution per label (imagemill.evaluation.score_distribution), when the job is scored,
  and SSIM's and PSNR's against the sources, when it is image-to-image.

Per label, a label's images are compared with that label's reference images where the reference is
labelled (`reference_label_column`; a label with fewer than 2 has no FID/KID), else the whole reference.

Each number is a metric (imagemill.evaluation.metric): every committed shard's files are read once,
each metric takes its partial of it and merges it in, and each computes its typed result
(imagemill.core.evaluation_results), which the job record stores and the report reads.

The Inception Score needs a classifier head: with `features: inception` it comes from the merged class
sums (imagemill.core.inception_score; over all images at once, splits=1), job-wide and per label; with
CLIP or pixel features it is null.
"""

from __future__ import annotations

import torch

from imagemill.core.evaluation_results import EvaluationResults, ScoreColumn
from imagemill.core.records import ShardStats
from imagemill.core.spec import JobSpec
from imagemill.core.write_gate import OwnedOutput
from imagemill.evaluation.embedding_passes import LabelledSamples
from imagemill.evaluation.feature_metrics import FrechetDistance, InceptionScore
from imagemill.evaluation.leakage import Leakage
from imagemill.evaluation.metric import merge_over, read_shards
from imagemill.evaluation.near_duplicates import NearDuplicates
from imagemill.evaluation.reference import load_reference
from imagemill.evaluation.sample_metrics import Diversity, KernelDistance
from imagemill.evaluation.score_distribution import score_distributions


def evaluate(spec: JobSpec, owned: OwnedOutput, committed: dict[str, ShardStats]) -> EvaluationResults:
    """The dataset's numbers, for `_job.json`'s `evaluation` and the report's dataset section; its
    files are written through `owned` (core/write_gate.py)."""
    output = owned.layout
    settings = spec.evaluation
    assert settings is not None
    reference = None
    if settings.reference is not None:
        reference = load_reference(settings, owned, "cuda" if torch.cuda.is_available() else "cpu")
    label_samples = LabelledSamples(settings.diversity_sample, settings.diversity_sample, settings.seed)
    metrics = (
        FrechetDistance(reference),
        InceptionScore(),
        KernelDistance(
            reference, LabelledSamples(settings.kid_sample, settings.diversity_sample, settings.seed)
        ),
        Diversity(label_samples),
        NearDuplicates(owned, settings.duplicate_threshold),
    )
    if reference is not None and settings.leakage:
        metrics += (Leakage(owned, reference, settings.reference, settings.duplicate_threshold),)
    finished = {shard_id: stats.finished_at for shard_id, stats in committed.items()}
    fid, inception, kid, diversity, duplicates, *leakage = merge_over(metrics, read_shards(output, finished))
    columns: list[ScoreColumn] = [
        *(["clip_score"] if spec.scoring else []),
        *(["ssim", "psnr"] if spec.input.image_column else []),
        *(["reference_ssim", "reference_psnr"] if spec.input.reference_column else []),
    ]
    scores = score_distributions(output, sorted(committed), spec.label_column(), columns)
    return EvaluationResults(
        images=duplicates.streamed.images,  # every embedded image: its state counts them
        diversity=diversity.compute(),
        near_duplicates=duplicates.compute(),
        inception_score=inception.compute(),
        clip_score=scores.get("clip_score"),
        ssim=scores.get("ssim"),
        psnr=scores.get("psnr"),
        reference_ssim=scores.get("reference_ssim"),
        reference_psnr=scores.get("reference_psnr"),
        fid=fid.compute(),
        kid=kid.compute(),
        leakage=leakage[0].compute() if leakage else None,
    )
