"""The records actors write and the driver reads: declared here once, imported by both sides.

- `MetadataRow`: one row of `metadata/<shard_id>.parquet`. Its fields are the columns, in order, and
  `METADATA_SCHEMA` is derived from their type hints, so the type and the Parquet schema cannot drift.
- `ShardStats`: `shards/<shard_id>.json`, the shard's commit, also what an actor returns to the driver.
  `from_json` reads files of any earlier imagemill: unknown keys are ignored, missing ones take their
  defaults; only the counts (`shard_id`, `rows`, `ok`, `error`) are required.
- `ClipScoreSummary`: the shard's CLIP scores (the `scoring` feature's `clip_score`) as counts per
  fixed bin, which the driver adds up (`merge_clip_scores`) without reading a metadata file.
- `ShardTotals`: the counts over committed shards that the summary, `status` and the report show.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import types
import typing
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Self, TypeVar

import pyarrow as pa

from imagemill.core.labels import merge_labels
from imagemill.core.stage_table import MODEL_STAGES  # the stages of `stage_seconds` the device is busy in

log = logging.getLogger(__name__)


if TYPE_CHECKING:
    from imagemill.core.layout import OutputLayout

# Scores are 100 × cosine similarity; CLIP ViT-L/14 gives real text-image pairs about 15..40, so bins
# of one point show the shape without making the stats large (a histogram is stored sparse).
SCORE_BIN_WIDTH = 1.0
# Texts the stats carry for the report are cut to this many characters: a prompt may be any size (a
# 1 MB prompt made a 1 MB report), and an error message may quote one.
PROMPT_CHARS = 300
EXAMPLES_PER_REASON = 2  # error messages kept per reason, in a shard's stats and in the report
T = TypeVar("T")


def capped(text: str | None, limit: int = PROMPT_CHARS) -> str | None:
    """`text` cut to `limit` characters, with "…" where it was cut."""
    return text if text is None or len(text) <= limit else text[:limit] + "…"


def add_error_example(examples: dict[str, list[str]], error: str) -> None:
    """Keep `error` (`reason: detail`, capped) among its reason's examples, up to EXAMPLES_PER_REASON
    distinct ones."""
    kept = examples.setdefault(error.split(":", 1)[0], [])
    message = capped(error)
    if len(kept) < EXAMPLES_PER_REASON and message not in kept:
        kept.append(message)


@dataclass(frozen=True, kw_only=True)
class MetadataRow:
    """One image's metadata row (one per input row, variant and image): ok, filtered or error.

    The field order is the column order of the metadata Parquet. `key` is a column of the
    `webdataset` format only (FORMAT_COLUMNS); the other formats' tables leave it out.
    """

    id: str
    prompt: str | None
    expanded_prompt: str | None = None  # what prompt expansion made of `prompt`; null without it
    prompt_truncated: bool
    negative_prompt: str | None
    seed: int | None  # parameters are null where the input's value was invalid (see `error`)
    num_inference_steps: int | None
    guidance_scale: float | None
    width: int | None
    height: int | None
    status: str  # ok | filtered | flagged (safety:) | error
    error: str | None = None  # `reason: detail`, for status=error
    path: str | None = None  # where the image is, relative to the output; null when none was written
    sha256: str | None = None  # of the encoded image
    model: str
    input_file: str
    input_row: int
    clip_score: float | None = None  # null when scoring is off or the row errored
    # safety: (workers/stages/safety.py) the highest concept margin (> 0: flagged) and the flagged concepts
    safety_score: float | None = None
    safety_concepts: str | None = None  # comma-separated, e.g. "concept_3,special_0"; null when none
    draw: int | None = None  # which draw of the row `seed` is (0: the row's own; workers/selection.py)
    rejected_draws: str | None = (
        None  # JSON list of the draws not kept: {draw, seed, clip_score, safety_score}
    )
    scheduler: str | None = None  # diffusers: the sampler's class (and model.scheduler's overrides)
    # Image-to-image (input.image_column): the source as its column gave a path (null for bytes: the
    # row's input_file and input_row name it), the strength used, and the output's SSIM and PSNR (dB)
    # against the source resized to the output's size. All null for text-to-image rows.
    source_image: str | None = None
    strength: float | None = None
    ssim: float | None = None
    psnr: float | None = None
    key: str | None = None  # webdataset: the sample's key in its shard's tar

    def columns(self) -> dict[str, Any]:
        return {column.name: getattr(self, column.name) for column in dataclasses.fields(self)}


FORMAT_COLUMNS = ("key",)
_ARROW_TYPES = {str: pa.string(), bool: pa.bool_(), int: pa.int64(), float: pa.float64()}


def _arrow_field(name: str, hint: Any) -> pa.Field:
    """`str | None` → a nullable string column, and so on; every column is nullable, as before."""
    kinds = [kind for kind in typing.get_args(hint) if kind is not types.NoneType] or [hint]
    return pa.field(name, _ARROW_TYPES[kinds[0]])


_ROW_FIELDS = {name: _arrow_field(name, hint) for name, hint in typing.get_type_hints(MetadataRow).items()}
METADATA_SCHEMA = pa.schema([f for name, f in _ROW_FIELDS.items() if name not in FORMAT_COLUMNS])


def metadata_schema(format_columns: Iterable[str] = ()) -> pa.Schema:
    """METADATA_SCHEMA plus the named FORMAT_COLUMNS an output format adds."""
    return pa.schema([*METADATA_SCHEMA, *(_ROW_FIELDS[name] for name in format_columns)])


def metadata_table(rows: Iterable[MetadataRow], format_columns: Iterable[str] = ()) -> pa.Table:
    """A shard's metadata rows as the table its metadata Parquet holds."""
    return pa.Table.from_pylist([row.columns() for row in rows], schema=metadata_schema(format_columns))


def _from_fields(cls: type[T], data: Mapping[str, Any], **converted: Any) -> T:
    """`cls` from the keys of `data` that are its fields (others ignored: written by another version);
    fields missing from `data` take their defaults. `converted` replaces values read as plain JSON."""
    names = {f.name for f in dataclasses.fields(cls)} - set(converted)  # type: ignore[arg-type]
    return cls(**{name: value for name, value in data.items() if name in names}, **converted)


@dataclass(frozen=True)
class ClipScoreSummary:
    """A shard's CLIP scores: count, sum, min, max and a sparse histogram of fixed bins (bin k holds
    scores in [k·SCORE_BIN_WIDTH, (k+1)·SCORE_BIN_WIDTH), keyed by its lower edge). Fixed bins add up
    bin by bin, so the job's distribution is exact whatever the shards."""

    count: int
    sum: float
    min: float
    max: float
    histogram: dict[str, int]

    @classmethod
    def of(cls, scores: list[float]) -> Self | None:
        """None when there is no score (scoring off, or no row scored)."""
        if not scores:
            return None
        edges = Counter(f"{math.floor(score / SCORE_BIN_WIDTH) * SCORE_BIN_WIDTH:g}" for score in scores)
        return cls(len(scores), sum(scores), min(scores), max(scores), dict(sorted(edges.items())))

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> Self | None:
        return None if data is None else _from_fields(cls, data)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def merge_clip_scores(summaries: Iterable[ClipScoreSummary | None]) -> dict[str, Any] | None:
    """The job's distribution from the shards' summaries, as the report shows it: count, mean, min,
    max and the non-empty bins in order, each as {low, high, count}. None when no shard has scores."""
    present = [summary for summary in summaries if summary is not None]
    if not present:
        return None
    histogram: Counter[str] = Counter()
    for summary in present:
        histogram.update(summary.histogram)
    count = sum(summary.count for summary in present)
    return {
        "count": count,
        "mean": round(sum(summary.sum for summary in present) / count, 4),
        "min": round(min(summary.min for summary in present), 4),
        "max": round(max(summary.max for summary in present), 4),
        "bin_width": SCORE_BIN_WIDTH,
        "bins": [
            {"low": float(low), "high": float(low) + SCORE_BIN_WIDTH, "count": histogram[low]}
            for low in sorted(histogram, key=float)
        ],
    }


@dataclass(frozen=True)
class Sample:
    """A thumbnail of one of the shard's images, for the report's contact sheet."""

    id: str
    prompt: str | None = None
    seed: int | None = None
    thumbnail: str = ""  # a data: URI
    expanded_prompt: str | None = None
    label: str | None = None  # its label (imagemill.core.labels.label_key), when the job has a label column


@dataclass(kw_only=True)
class ShardStats:
    """A shard's counts and timings: `shards/<shard_id>.json`, written last, commits the shard."""

    shard_id: str
    run_id: str | None = None  # the run that committed it (imagemill.core.lease); None before leases
    input_file: str = ""
    rows: int
    ok: int
    filtered: int = 0  # done, but scored under scoring.threshold
    flagged: int = 0  # done, but flagged by the safety classifier (kept, blurred or dropped)
    error: int
    errors_by_reason: dict[str, int] = field(default_factory=dict)
    error_examples: dict[str, list[str]] = field(default_factory=dict)  # reason: a few messages, capped
    finished_at: str | None = None  # ISO 8601, UTC
    seconds: float = 0.0  # the whole shard call
    write_wait_seconds: float = 0.0  # after giving the model up: waiting for the writer threads, close()
    stage_seconds: dict[str, float] = field(default_factory=dict)  # workers/stage_timer.py's STAGES
    timeline: dict[str, list[float]] = field(default_factory=dict)  # read/model: [start, end], Unix s
    images_per_second: float = 0.0
    device: str | None = None
    peak_rss_mb: float | None = None
    samples: list[Sample] = field(default_factory=list)
    clip_score: ClipScoreSummary | None = None
    expand_seconds: float | None = None  # prompt expansion only, as the next one
    expansion_unchanged: int | None = None
    redraws: int = 0  # images drawn beyond one per row: best-of-N candidates and safety retries
    rejected_candidates: int = 0  # candidates drawn and not kept (best-of-N; not filtering)
    labels: dict[str, dict[str, int]] = field(default_factory=dict)  # label: ok/filtered/error rows
    # imagemill.core.cost: the device time the shard held (GPU- or CPU-seconds, as device_kind says), priced
    device_seconds: float | None = None
    device_kind: str | None = None
    accelerator_type: str | None = None  # as Ray names it (H100, A10G); None on CPU or when unknown
    cost_usd: float | None = None  # None without a price for its device

    @property
    def read_seconds(self) -> float:
        return self.stage_seconds.get("read", 0.0)

    @property
    def model_seconds(self) -> float:
        """The model's working time: text encoding, denoising and decoding."""
        return sum(self.stage_seconds.get(stage, 0.0) for stage in MODEL_STAGES)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        return _from_fields(
            cls,
            data,
            samples=[_from_fields(Sample, sample) for sample in data.get("samples", [])],
            clip_score=ClipScoreSummary.from_json(data.get("clip_score")),
        )

    def to_json(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        for name in ("expand_seconds", "expansion_unchanged", "labels"):
            if record[name] is None or record[name] == {}:  # absent: as files without them
                del record[name]
        return record


def committed_shards(output: OutputLayout) -> dict[str, ShardStats]:
    """The committed shards' stats, by shard id. A stats file without its counts commits nothing: like
    any record that does not read, its shard counts as not done (and is redone), with a warning."""
    committed = {}
    for shard_id, data in output.committed_stats().items():
        try:
            committed[shard_id] = ShardStats.from_json(data)
        except TypeError as exc:  # a required count is missing
            path = output.path(output.stats_path(shard_id))
            log.warning(
                "%s is not a shard record imagemill can read (%s); its shard will be redone", path, exc
            )
    return committed


@dataclass(frozen=True)
class ShardTotals:
    """Counts summed over committed shards' stats: what the summary, `status` and the report show."""

    rows: int
    ok: int
    errors: int
    errors_by_reason: dict[str, int]
    filtered: int = 0  # scored below scoring.threshold: done, like ok rows, but not errors
    flagged: int = 0  # flagged by the safety classifier: done, counted apart
    rejected_candidates: int = 0  # best-of-N candidates not kept
    labels: dict[str, dict[str, int]] = field(default_factory=dict)  # imagemill.core.labels.merge_labels


def shard_totals(shards: Iterable[ShardStats]) -> ShardTotals:
    shards = list(shards)
    reasons: Counter[str] = Counter()
    for stats in shards:
        reasons.update(stats.errors_by_reason)
    return ShardTotals(
        rows=sum(stats.rows for stats in shards),
        ok=sum(stats.ok for stats in shards),
        errors=sum(stats.error for stats in shards),
        errors_by_reason=dict(sorted(reasons.items())),
        filtered=sum(stats.filtered for stats in shards),
        flagged=sum(stats.flagged for stats in shards),
        rejected_candidates=sum(stats.rejected_candidates for stats in shards),
        labels=merge_labels(stats.labels for stats in shards),
    )
