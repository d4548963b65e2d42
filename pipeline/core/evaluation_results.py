"""The evaluation's typed results (`evaluation:`): what the post-pass (imagemill.evaluation.post_pass)
computes, the job record (`_job.json`'s `evaluation`) stores as `model_dump(mode="json")` and the
report reads back with `EvaluationResults.model_validate`.

They live in core because the job record holds them; only the driver builds or reads them (the
actors write the per-shard files the metrics merge, never these). Each metric's result says how it
shows in the report (`report_table`): the caption, header and rows, numbers rounded for reading
(report.json keeps them whole). `schema_version` is bumped when a field changes meaning.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict

from imagemill.core.features import JOB_WIDE

SCHEMA_VERSION = 1
ALL_IMAGES = "all images"  # the report's name for the job-wide row

Table = tuple[str, tuple[str, ...], list[tuple[Any, ...]]]  # (caption, header, rows)


def rounded(value: float | None, digits: int = 4) -> float | str:
    """A number as the report shows it; "–" for none (too few images, no reference)."""
    return "–" if value is None else round(value, digits)


class _Result(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LabelledValues(_Result):
    """A number job-wide (`all`; None where it has no value) and per label (only labels that have one)."""

    all: float | None = None
    per_label: dict[str, float | None] = {}

    @classmethod
    def of(cls, values: Mapping[str | None, float | None], **fields: Any) -> Self:
        """From {label (None: job-wide): value}, labels in order."""
        labels = sorted(label for label in values if label is not None)
        return cls(all=values.get(JOB_WIDE), per_label={label: values[label] for label in labels}, **fields)

    def rows(self) -> list[tuple[str, float | None]]:
        """("all images", job-wide value), then (label, value) in label order."""
        return [(ALL_IMAGES, self.all), *sorted(self.per_label.items())]

    def table(self, caption: str, column: str) -> Table:
        """The values as a report table of one column, rounded."""
        return (caption, ("images", column), [(label, rounded(value)) for label, value in self.rows()])


class FrechetDistanceResult(LabelledValues):
    """FID against the reference (imagemill.evaluation.distribution_metrics)."""


class KernelDistanceResult(LabelledValues):
    """KID against the reference, from seeded samples (imagemill.evaluation.embedding_passes)."""


def distance_table(fid: FrechetDistanceResult, kid: KernelDistanceResult | None) -> Table:
    """FID and KID side by side, one row per FID row (KID has no value where the reference has no
    features: precomputed statistics)."""
    kids = dict(kid.rows()) if kid is not None else {}
    rows = [(label, rounded(value), rounded(kids.get(label), 6)) for label, value in fid.rows()]
    return ("Distance to the reference", ("images", "FID", "KID"), rows)


class InceptionScoreResult(LabelledValues):
    """IS over all the images at once (`splits` = 1, imagemill.core.inception_score)."""

    splits: int

    def report_table(self) -> Table:
        caption = "Inception Score over all images at once (splits=1; higher is more confident and varied)"
        return self.table(caption, "IS")


class DiversityResult(LabelledValues):
    """The mean pairwise cosine distance of a seeded sample, job-wide and per label."""

    def report_table(self) -> Table:
        caption = "Diversity: mean pairwise cosine distance of a seeded sample (higher is more varied)"
        return self.table(caption, "diversity")


class ScoreSummary(_Result):
    """A score of a set of rows (a metadata column: clip_score, ssim, psnr, reference_ssim,
    reference_psnr): how many, their mean and numpy's linear percentiles."""

    count: int
    mean: float
    p10: float
    p50: float
    p90: float


ScoreColumn = Literal["clip_score", "ssim", "psnr", "reference_ssim", "reference_psnr"]
SCORE_CAPTIONS: dict[str, str] = {
    "clip_score": "CLIP score (how well each image matches its prompt) per label",
    "ssim": "SSIM against the source image (image-to-image; 1 is the source itself) per label",
    "psnr": "PSNR in dB against the source image (image-to-image; higher is closer to it) per label",
    "reference_ssim": "SSIM of the upscaled image against its high-resolution reference (1 is the "
    "reference itself) per label",
    "reference_psnr": "PSNR in dB of the upscaled image against its high-resolution reference (higher "
    "is closer to it) per label",
}


class ScoreDistribution(_Result):
    """A metadata score column's distribution job-wide and per label
    (imagemill.evaluation.score_distribution)."""

    column: ScoreColumn = "clip_score"
    all: ScoreSummary | None = None
    per_label: dict[str, ScoreSummary] = {}

    def report_table(self) -> Table:
        rows = [(ALL_IMAGES, self.all), *sorted(self.per_label.items())]
        return (
            SCORE_CAPTIONS[self.column],
            ("images", "count", "mean", "p10", "p50", "p90"),
            [
                (label, s.count, *(rounded(q) for q in (s.mean, s.p10, s.p50, s.p90)))
                for label, s in rows
                if s is not None
            ],
        )


class DuplicatePair(_Result):
    id: str
    nearest: str  # the id of its most similar image
    cosine: float


class NearDuplicatesResult(_Result):
    """How many images have a near-duplicate, in how many groups, with the first groups' pairs; every
    marked image is in `file` (imagemill.evaluation.near_duplicates)."""

    threshold: float
    file: str
    images: int
    groups: int
    examples: list[DuplicatePair]

    def report_table(self) -> Table:
        return (
            f"Near-duplicates (cosine ≥ {self.threshold}): {self.images} images in {self.groups} groups, "
            f"listed in {self.file}",
            ("image", "most similar image", "cosine"),
            [(pair.id, pair.nearest, pair.cosine) for pair in self.examples],
        )


class LeakagePair(_Result):
    id: str
    reference: str  # the reference image's file, relative to the reference
    reference_row: int | None  # its row in that Parquet file; None for an image file
    cosine: float


class LeakageResult(_Result):
    """Generated images close to a reference image, with the first pairs; every one is in `file`
    (imagemill.evaluation.leakage)."""

    threshold: float
    file: str
    images: int
    examples: list[LeakagePair]

    def report_table(self) -> Table:
        rows = [
            (
                pair.id,
                pair.reference + ("" if pair.reference_row is None else f" row {pair.reference_row}"),
                pair.cosine,
            )
            for pair in self.examples
        ]
        caption = (
            f"Leakage (cosine ≥ {self.threshold} to a reference image): {self.images} images, "
            f"listed in {self.file}"
        )
        return (caption, ("image", "reference image", "cosine"), rows)


class EvaluationResults(_Result):
    """The whole evaluation of a job. A None metric was not computed: `fid`, `kid` without a
    reference, `leakage` without `evaluation.leakage`, `inception_score` without a classifier head,
    `clip_score` when the job does not score, `ssim` and `psnr` when it is not image-to-image,
    `reference_ssim` and `reference_psnr` without `input.reference_column`."""

    schema_version: Literal[1] = SCHEMA_VERSION
    images: int
    diversity: DiversityResult
    near_duplicates: NearDuplicatesResult
    inception_score: InceptionScoreResult | None = None
    clip_score: ScoreDistribution | None = None
    ssim: ScoreDistribution | None = None
    psnr: ScoreDistribution | None = None
    reference_ssim: ScoreDistribution | None = None
    reference_psnr: ScoreDistribution | None = None
    fid: FrechetDistanceResult | None = None
    kid: KernelDistanceResult | None = None
    leakage: LeakageResult | None = None

    def report_tables(self) -> list[Table]:
        """The report's dataset section, in the order it shows them."""
        tables: list[Table] = []
        if self.fid is not None:
            tables.append(distance_table(self.fid, self.kid))
        if self.inception_score is not None:
            tables.append(self.inception_score.report_table())
        tables.append(self.diversity.report_table())
        for scores in (self.clip_score, self.ssim, self.psnr, self.reference_ssim, self.reference_psnr):
            if scores is not None:
                tables.append(scores.report_table())
        tables.append(self.near_duplicates.report_table())
        if self.leakage is not None:
            tables.append(self.leakage.report_table())
        return tables
