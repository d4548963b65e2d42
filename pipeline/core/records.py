"""The records actors write and the driver reads: declared here once, imported by both sides.

- `MetadataRow`: one row of `metadata/<shard_id>.parquet`. Its fields are the columns, in order, and
  `METADATA_SCHEMA` is derived from their type hints, so the type and the Parquet schema cannot drift.
- `ShardStats`: `shards/<shard_id>.json`, the shard's commit, also what an actor returns to the driver.
- `StoredRecord`: the base of every JSON record imagemill writes into an output (the shard stats here,
  the job record in imagemill.core.job_record): a strict pydantic model with a `schema_version`, written
  by `record_bytes` and read by `read_record`, the one place that checks the version. A record of any
  other version (an older imagemill's, without one, or a newer one's) is refused in one line that says
  to re-run with --overwrite or into a new output: there is no migration yet, so nothing reads a record
  as an older imagemill wrote it.
- `ClipScoreSummary`: the shard's CLIP scores (the `scoring` feature's `clip_score`) as counts per
  fixed bin, which the driver adds up (`merge_clip_scores`) without reading a metadata file.
- `ShardTotals`: the counts over committed shards that the summary, `status` and the report show.
- `RunProgress`: a live run's progress, which its heartbeat carries in the output's lease file
  (imagemill.core.lease) and `status` reads back (`run_progress`) while shards are still running.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import types
import typing
from collections import Counter
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Self, TypeVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from imagemill.core.errors import ImagemillError
from imagemill.core.labels import merge_labels
from imagemill.core.layout import OutputLayout
from imagemill.core.stage_table import MODEL_STAGES  # the stages of `stage_seconds` the device is busy in

log = logging.getLogger(__name__)


if TYPE_CHECKING:
    from imagemill.core.write_gate import ShardAttempt

# Scores are 100 × cosine similarity; CLIP ViT-L/14 gives real text-image pairs about 15..40, so bins
# of one point show the shape without making the stats large (a histogram is stored sparse).
SCORE_BIN_WIDTH = 1.0
# Texts the stats carry for the report are cut to this many characters: a prompt may be any size (a
# 1 MB prompt made a 1 MB report), and an error message may quote one.
PROMPT_CHARS = 300
EXAMPLES_PER_REASON = 2  # error messages kept per reason, in a shard's stats and in the report
# The schema of the JSON records this imagemill writes into an output (`_job.json`, `shards/*.json`).
# Raise it when a record's fields change meaning or a required one is added; records of another
# version are refused (read_record) unless a migration for that version is added there.
# 2: `_job.json`'s cost counts every attempt (imagemill.core.device_ledger) and says how many failed;
# the job record keeps its earlier runs (imagemill.core.job_record).
SCHEMA_VERSION = 2
R = TypeVar("R", bound="StoredRecord")
# An attempt's device time and cost (imagemill.core.cost) read from a record are at most these: a
# broken or hostile record must not overflow the ledger's sums, nor a negative one un-spend a budget.
MAX_DEVICE_SECONDS = 1e12
MAX_COST_USD = 1e12


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
    # output.watermark: whether the payload read back from the encoded file (provenance.watermark)
    watermark_ok: bool | None = None
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
    # against the source resized to the output's size (inpainting: over the pixels outside the mask,
    # and `mask_image` names the mask as source_image does). All null for text-to-image rows.
    source_image: str | None = None
    mask_image: str | None = None
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


class RecordPart(BaseModel):
    """A part of a JSON record in an output. Strict (a count read as "3" or a NaN is a broken record,
    not a value) and closed (an unknown key means another schema)."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, validate_assignment=True)


class StoredRecord(RecordPart):
    """A whole JSON record in an output: a RecordPart with the schema version it was written in."""

    schema_version: int = SCHEMA_VERSION

    def record_bytes(self) -> bytes:
        """The record as its file holds it."""
        return self.model_dump_json(indent=2).encode()


class _Header(BaseModel):
    """What any version of a record is read for before its own model: its version and, for a shard's
    stats, whose they are."""

    model_config = ConfigDict(extra="ignore")

    schema_version: int | None = None
    shard_id: str | None = None

    @classmethod
    def of(cls, data: bytes) -> _Header | None:
        """None where `data` is not a JSON object."""
        try:
            return cls.model_validate_json(data)
        except ValidationError:
            return None


class OutdatedRecord(ImagemillError):
    """A record of a schema version this imagemill does not read."""


def read_record(model: type[R], path: str, data: bytes, warn: bool = True) -> R | None:
    """`data` (the file at `path`) as `model`. A record of another schema version is refused
    (OutdatedRecord, one line); one that does not read as its model (cut short, someone else's file)
    is None, with a warning: like no record at all, it must never crash a job or `status`."""
    header = _Header.of(data)
    if header is not None and header.schema_version != SCHEMA_VERSION:
        found = (
            "no schema_version"
            if header.schema_version is None
            else f"schema_version {header.schema_version}"
        )
        raise OutdatedRecord(
            f"{path} has {found}, and this imagemill reads and writes schema_version {SCHEMA_VERSION}: "
            "re-run the job with --overwrite to make its output again, or run it into a new output"
        )
    try:
        return model.model_validate_json(data)
    except ValidationError as exc:
        if warn:
            reason = exc.errors()[0]
            where = ".".join(str(part) for part in reason["loc"])
            log.warning("%s is not a record imagemill can read (%s: %s)", path, where or "-", reason["msg"])
        return None


class ClipScoreSummary(RecordPart):
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
        scores = [float(score) for score in scores]
        edges = Counter(f"{math.floor(score / SCORE_BIN_WIDTH) * SCORE_BIN_WIDTH:g}" for score in scores)
        return cls(
            count=len(scores),
            sum=sum(scores),
            min=min(scores),
            max=max(scores),
            histogram=dict(sorted(edges.items())),
        )


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


class Sample(RecordPart):
    """A thumbnail of one of the shard's images, for the report's contact sheet."""

    id: str
    prompt: str | None = None
    seed: int | None = None
    thumbnail: str = ""  # a data: URI
    expanded_prompt: str | None = None
    label: str | None = None  # its label (imagemill.core.labels.label_key), when the job has a label column


class ShardStats(StoredRecord):
    """A shard's counts and timings: `shards/<shard_id>.json`, written last, commits the shard."""

    shard_id: str
    run_id: str | None = None  # the run that committed it (imagemill.core.lease); None in process
    worker: str | None = None  # the actor that committed it (imagemill:<job>:<run>:<n>); None in process
    input_file: str = ""
    rows: int
    ok: int
    filtered: int = 0  # done, but scored under scoring.threshold
    flagged: int = 0  # done, but flagged by the safety classifier (kept, blurred or dropped)
    watermark_unreadable: int = 0  # written with output.watermark, which did not read back (watermark_ok)
    error: int
    errors_by_reason: dict[str, int] = Field(default_factory=dict)
    error_examples: dict[str, list[str]] = Field(default_factory=dict)  # reason: a few messages, capped
    finished_at: str | None = None  # ISO 8601, UTC
    seconds: float = 0.0  # the whole shard call
    write_wait_seconds: float = 0.0  # after giving the model up: waiting for the writer threads, close()
    stage_seconds: dict[str, float] = Field(default_factory=dict)  # workers/stage_timer.py's STAGES
    timeline: dict[str, list[float]] = Field(default_factory=dict)  # read/model: [start, end], Unix s
    images_per_second: float = 0.0
    device: str | None = None
    peak_rss_mb: float | None = None
    samples: list[Sample] = Field(default_factory=list)
    clip_score: ClipScoreSummary | None = None
    expand_seconds: float | None = None  # prompt expansion only, as the next one
    expansion_unchanged: int | None = None
    redraws: int = 0  # images drawn beyond one per row: best-of-N candidates and safety retries
    rejected_candidates: int = 0  # candidates drawn and not kept (best-of-N; not filtering)
    labels: dict[str, dict[str, int]] = Field(default_factory=dict)  # label: ok/filtered/error rows
    # imagemill.core.cost: the device time the shard held (GPU- or CPU-seconds, as device_kind says), priced
    device_seconds: float | None = Field(None, ge=0, le=MAX_DEVICE_SECONDS)
    device_kind: str | None = None
    accelerator_type: str | None = None  # as Ray names it (H100, A10G); None on CPU or when unknown
    cost_usd: float | None = Field(None, ge=0, le=MAX_COST_USD)  # None without a price for its device

    @property
    def read_seconds(self) -> float:
        return self.stage_seconds.get("read", 0.0)

    @property
    def model_seconds(self) -> float:
        """The model's working time: text encoding, denoising and decoding."""
        return sum(self.stage_seconds.get(stage, 0.0) for stage in MODEL_STAGES)


def commit_shard(attempt: ShardAttempt, stats: ShardStats) -> ShardStats:
    """Publish a shard attempt's files and then its stats, create-only: its commit (core/write_gate.py).
    Returns the stats committed: these, or those of this run's earlier attempt at the shard that
    committed and whose answer was lost (an actor that died right after), which stand."""
    path = OutputLayout.stats_path(stats.shard_id)

    def ours(data: bytes) -> bool:
        committed = read_record(ShardStats, path, data, warn=False)
        return stats.run_id is not None and committed is not None and committed.run_id == stats.run_id

    existing = attempt.commit(path, stats.record_bytes(), ours)
    committed = stats if existing is None else read_record(ShardStats, path, existing, warn=False)
    assert committed is not None  # `ours` read it
    return committed


def _stored_stats(output: OutputLayout) -> dict[str, bytes]:
    """The bytes of every stats file in shards/, by the shard id its name gives."""
    names = [
        name
        for name, is_folder in output.entries("shards").items()
        if name.endswith(".json") and not is_folder
    ]
    with ThreadPoolExecutor(max_workers=16) as pool:
        read = list(pool.map(lambda name: output.read_bytes(f"shards/{name}"), names))
    return {
        name.removesuffix(".json"): data for name, data in zip(names, read, strict=True) if data is not None
    }


def stats_shard_ids(output: OutputLayout) -> set[str]:
    """The shards whose stats file is in shards/, of any schema version: what --overwrite deletes as
    committed (their metadata names their files) and what counts as imagemill's own in a new output."""
    stored = _stored_stats(output).items()
    return {shard_id for shard_id, data in stored if getattr(_Header.of(data), "shard_id", None) == shard_id}


def committed_shards(output: OutputLayout) -> dict[str, ShardStats]:
    """The committed shards' stats, by shard id. Stats of another schema version are refused
    (read_record). A stats file that does not read commits nothing: its shard counts as not done (and
    is redone), with a warning; so does a file in shards/ that is not its shard's stats."""
    committed = {}
    for shard_id, data in _stored_stats(output).items():
        path = output.path(output.stats_path(shard_id))
        if getattr(_Header.of(data), "shard_id", None) != shard_id:
            log.warning("%s is not this shard's stats; its shard will be redone", path)
        elif (stats := read_record(ShardStats, path, data)) is not None:
            committed[shard_id] = stats
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
    watermark_unreadable: int = 0  # images whose watermark did not read back (any status)
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
        watermark_unreadable=sum(stats.watermark_unreadable for stats in shards),
        rejected_candidates=sum(stats.rejected_candidates for stats in shards),
        labels=merge_labels(stats.labels for stats in shards),
    )


class RunProgress(RecordPart):
    """A live run's progress, as the driver last knew it: images drawn (the committed shards' rows plus
    the rows drawn so far in the shards still running) and workers still loading the model. Written into
    the lease at each heartbeat, so `imagemill status` sees a shard's progress before it commits."""

    images_done: int = Field(ge=0)
    images_total: int = Field(ge=0)
    shards_done: int = Field(ge=0)
    shards_total: int = Field(ge=0)
    workers_ready: int = Field(ge=0)
    workers_loading: int = Field(ge=0)  # started, model not loaded yet (or not yet placed)


LEASE_PROGRESS_KEY = "progress"  # the lease record's key that holds the run's RunProgress


def run_progress(lease_record: Mapping[str, Any]) -> RunProgress | None:
    """The progress a lease record carries; None when it has none or it does not read as one (a lease
    written by hand or cut short must not break `status`)."""
    data = lease_record.get(LEASE_PROGRESS_KEY)
    if not isinstance(data, dict):
        return None
    try:
        return RunProgress.model_validate(data)
    except ValidationError:
        return None
