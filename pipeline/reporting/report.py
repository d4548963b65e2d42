"""The job report: `report.json` and a self-contained `report.html` at the output root.

Everything comes from `_job.json` and the committed shards' stats (`shards/*.json`), which carry a few
small JPEG thumbnails each; no image file is ever read, so the driver handles no image bytes. The page
has inline CSS and SVG only: no scripts, no external requests. Counts come from the committed shards,
as in `imagemill status`, so a report of a running or killed job is right too.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from html import escape
from typing import Any

from imagemill.core.cost import device_time
from imagemill.core.device_ledger import DeviceLedger, read_ledger
from imagemill.core.errors import ImagemillError
from imagemill.core.evaluation_results import EvaluationResults
from imagemill.core.job_record import JobRecord, RunEntry, read_job_record
from imagemill.core.labels import LABELS_SHOWN, STATUSES
from imagemill.core.layout import JOB_RECORD, REPORT_HTML, REPORT_JSON
from imagemill.core.records import (
    EXAMPLES_PER_REASON,
    Sample,
    ShardStats,
    capped,
    committed_shards,
    merge_clip_scores,
    shard_totals,
)
from imagemill.core.stage_table import MODEL_STAGES
from imagemill.core.stage_table import STAGE_LABELS as ACTOR_STAGE_LABELS
from imagemill.core.write_gate import OwnedOutput
from imagemill.planning.inputs import counted
from imagemill.reporting.report_dataset import dataset_results, dataset_tables

MAX_POINTS = 60  # time buckets in the throughput series, at most
SECONDS_AXIS_UNTIL = 180  # jobs shorter than this get their time axis in seconds, longer ones minutes
NICE_BUCKETS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)
SAMPLE_HOVER = ("id", "label", "seed", "prompt", "expanded_prompt")  # a thumbnail's title, where present
_THUMBNAIL = re.compile(r"data:image/(jpeg|png|webp);base64,[A-Za-z0-9+/]*={0,2}")
# Each shard's `stage_seconds` (imagemill.core.stage_table), and `expand_seconds` where prompts are
# expanded, which comes after the read.
NONE = '<p class="none">none</p>'
STAGE_LABELS = {"read": ACTOR_STAGE_LABELS["read"], "expand": "prompt expansion"} | ACTOR_STAGE_LABELS


def write_report(owned: OwnedOutput, max_samples: int = 48) -> dict[str, Any]:
    """Write report.json and report.html at the output root (through the write gate, `owned`); returns
    what report.json holds."""
    output = owned.layout
    record = read_job_record(output)
    if record is None:
        raise ImagemillError(f"no imagemill job found at {output.url} (it has no readable {JOB_RECORD})")
    # Only the shards that count: not those of input files gone since (imagemill.planning.inputs).
    shards = sorted(counted(record, committed_shards(output)), key=lambda stats: stats.shard_id)
    samples = pick_samples(shards, max_samples)
    report = build_report(record, shards, samples, read_ledger(output, shards))
    thumbnails = [sample.thumbnail for _, sample in samples]
    owned.write_json(REPORT_JSON, report)
    owned.write_whole(REPORT_HTML, render_html(report, thumbnails).encode())
    return report


def build_report(
    record: JobRecord, shards: list[ShardStats], samples: list[tuple[str, Sample]], ledger: DeviceLedger
) -> dict[str, Any]:
    """What report.json holds; `ledger`: the job's device-time ledger, for its cost."""
    totals = shard_totals(shards)
    failed = record.failed_shards
    stages = _stage_seconds(shards)
    runs = [_run_json(run, shards) for run in record.all_runs(shards)]
    return {
        "name": record.name,
        "status": record.status,
        "started_at": runs[0]["started_at"],
        "ended_at": record.ended_at,
        "duration_seconds": _sum(run["seconds"] for run in runs),  # over all runs, not between them
        "runs": runs,
        "counts": {
            "rows_total": record.rows_total,
            "rows_done": totals.rows,
            "rows_ok": totals.ok,
            "rows_filtered": totals.filtered,
            "rows_flagged": totals.flagged,
            "rows_watermark_unreadable": totals.watermark_unreadable,
            "candidates_rejected": totals.rejected_candidates,
            "rows_error": totals.errors,
            "shards_total": record.shards_total,
            "shards_done": len(shards),
            "shards_failed": len(failed),
        },
        "errors_by_reason": totals.errors_by_reason,
        "error_examples": error_examples(shards),
        "failed_shards": [failure.model_dump() for failure in failed],
        "stage_seconds": stages,
        "cost": ledger.totals().to_json(),
        "model_busy_share": model_busy_share(stages, _expands_on_actor(record)),
        "throughput": throughput(runs, shards),
        "clip_score": clip_score(record, shards),
        "labels": totals.labels,
        "samples": [_sample_entry(shard_id, sample) for shard_id, sample in samples],
        "dataset": _dataset_json(record.evaluation),
    }


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not (start and end):
        return None
    return round(datetime.fromisoformat(end).timestamp() - datetime.fromisoformat(start).timestamp(), 3)


def _sum(values: Any) -> float | None:
    """The sum of the known values (None where none is known)."""
    known = [value for value in values if value is not None]
    return round(sum(known), 3) if known else None


def _run_json(run: RunEntry, shards: list[ShardStats]) -> dict[str, Any]:
    """A run as report.json lists it, with its start-up (its start until its first worker was ready),
    its whole time, and its generating time: from start-up's end to its last commit."""
    commits = [stats.finished_at for stats in shards if stats.run_id == run.run_id and stats.finished_at]
    last_commit = max(commits, key=datetime.fromisoformat, default=None)
    return run.model_dump() | {
        "startup_seconds": _seconds_between(run.started_at, run.ready_at),
        "seconds": _seconds_between(run.started_at, run.ended_at),
        "generating_seconds": _seconds_between(run.ready_at, last_commit) or 0.0,
    }


def error_examples(shards: list[ShardStats]) -> dict[str, list[str]]:
    """Up to EXAMPLES_PER_REASON distinct messages per error reason, from the shards in id order."""
    examples: dict[str, list[str]] = {}
    for stats in shards:
        for reason, messages in stats.error_examples.items():
            kept = examples.setdefault(reason, [])
            kept += [m for m in messages if m not in kept][: EXAMPLES_PER_REASON - len(kept)]
    return dict(sorted(examples.items()))


def _stage_seconds(shards: list[ShardStats]) -> dict[str, float]:
    """Seconds per stage summed over the shards, stages in STAGE_LABELS order (`expand` only for jobs
    with prompt expansion). There is no total: one shard reads while another holds the model, and the
    writer threads' stages overlap the model's, so the stages add up to more than the job took."""
    seconds: dict[str, float] = {}
    for stats in shards:
        expand = {"expand": stats.expand_seconds} if stats.expand_seconds is not None else {}
        for stage, spent in (stats.stage_seconds | expand).items():
            seconds[stage] = seconds.get(stage, 0.0) + spent
    order = list(STAGE_LABELS)
    return {
        stage: round(seconds[stage], 3)
        for stage in sorted(seconds, key=lambda s: order.index(s) if s in order else len(order))
    }


def model_busy_share(stages: dict[str, float], expands_on_actor: bool) -> float | None:
    """The share of the time the shards held the model that it was working: the GPU-busy figure.
    Prompt expansion is work when the actor runs it on its device (`placement: actor`), and waiting
    when the actor waits for the expander pool. None when the shards held the model for no time."""
    expand = stages.get("expand", 0.0)
    busy = sum(stages.get(stage, 0.0) for stage in MODEL_STAGES) + (expand if expands_on_actor else 0.0)
    held = busy + stages.get("idle", 0.0) + stages.get("host", 0.0) + (0.0 if expands_on_actor else expand)
    return round(busy / held, 4) if held > 0 else None


def _expands_on_actor(record: JobRecord) -> bool:
    return record.setting("expansion.placement") == "actor"


def _sample_entry(shard_id: str, sample: Sample) -> dict[str, Any]:
    """A sample as report.json lists it; `expanded_prompt` only where prompt expansion made one."""
    entry = {"id": sample.id, "prompt": capped(sample.prompt), "seed": sample.seed, "shard_id": shard_id}
    entry |= {"label": sample.label} if sample.label is not None else {}
    return entry | ({"expanded_prompt": capped(sample.expanded_prompt)} if sample.expanded_prompt else {})


def clip_score(record: JobRecord, shards: list[ShardStats]) -> dict[str, Any] | None:
    """The CLIP scores' distribution over the committed shards, with the job's threshold;
    None when the job does not score."""
    distribution = merge_clip_scores(stats.clip_score for stats in shards)
    if distribution is None:
        return None
    return {
        **distribution,
        "threshold": record.setting("scoring.threshold"),
        "on_low_score": record.setting("scoring.on_low_score"),
    }


def pick_samples(shards: list[ShardStats], max_samples: int) -> list[tuple[str, Sample]]:
    """Up to `max_samples` (shard id, sample), spread evenly over the shards (in shard id order), and
    first one of each label (up to LABELS_SHOWN labels, beyond `max_samples` if need be).

    Round r takes the r-th sample of every shard, or of evenly spaced shards where fewer places are
    left than shards have one. The result is in shard order; it depends on the stats alone.
    """
    usable = [[s for s in stats.samples if _THUMBNAIL.fullmatch(str(s.thumbnail))] for stats in shards]
    per_label: dict[str, tuple[int, int]] = {}  # label: its first sample, as (shard index, position)
    for index, samples in enumerate(usable):
        for r, sample in enumerate(samples):
            if sample.label is not None and sample.label not in per_label:
                per_label[sample.label] = (index, r)
    labelled = {per_label[label] for label in sorted(per_label)[:LABELS_SHOWN]}
    rounds: list[list[tuple[int, int]]] = []
    for index, samples in enumerate(usable):
        for r in range(len(samples)):
            if r == len(rounds):
                rounds.append([])
            if (index, r) not in labelled:
                rounds[r].append((index, r))
    chosen: list[tuple[int, int]] = list(labelled)
    for candidates in rounds:
        left = max_samples - len(chosen)
        if left <= 0:
            break
        step = len(candidates) / left
        chosen += candidates if left >= len(candidates) else [candidates[int(i * step)] for i in range(left)]
    return [(shards[index].shard_id, usable[index][r]) for index, r in sorted(chosen)]


def throughput(runs: list[dict[str, Any]], shards: list[ShardStats]) -> dict[str, Any]:
    """Cumulative images and images/s per time bucket, from each shard's finish time and ok count,
    and each run's start-up as a band of the time axis.

    Time 0 is the first run's start, or the earliest shard start if earlier. The first point is
    (0 min, 0 images); each further point is the end of a bucket. Beside the rate over that span: the
    rate while generating (the runs' generating time summed: no planning, no model loading, no time
    between runs) and over the runs' whole time (summed: start-up included).
    """
    started_at = runs[0]["started_at"]
    finished = sorted(
        (datetime.fromisoformat(stats.finished_at).timestamp(), stats.ok, stats.seconds)
        for stats in shards
        if stats.finished_at
    )
    if not finished:
        return {"start": started_at, "bucket_seconds": None, "images_per_second": 0.0, "points": []}
    start = min(datetime.fromisoformat(started_at).timestamp(), *(end - took for end, _, took in finished))
    span = finished[-1][0] - start
    bucket = next((b for b in NICE_BUCKETS if span / b <= MAX_POINTS), math.ceil(span / MAX_POINTS))
    per_bucket = [0] * max(1, math.ceil(span / bucket))
    for end, ok, _ in finished:
        per_bucket[min(int((end - start) // bucket), len(per_bucket) - 1)] += ok
    points = [{"minute": 0.0, "images": 0, "images_per_second": 0.0}]
    for b, images in enumerate(per_bucket):
        points.append(
            {
                "minute": round((b + 1) * bucket / 60, 3),
                "images": points[-1]["images"] + images,
                "images_per_second": round(images / bucket, 3),
            }
        )
    total = points[-1]["images"]
    generating = sum(run["generating_seconds"] for run in runs)
    wall_clock = _sum(run["seconds"] for run in runs)
    return {
        "start": datetime.fromtimestamp(start, UTC).isoformat(),
        "bucket_seconds": bucket,
        "images_per_second": round(total / span, 3) if span > 0 else 0.0,
        "runs": len(runs),
        "generation_seconds": round(generating, 3),
        "generation_images_per_second": round(total / generating, 3) if generating > 0 else 0.0,
        "wall_clock_seconds": wall_clock,
        "wall_clock_images_per_second": round(total / wall_clock, 3) if wall_clock else None,
        "startup_seconds": _sum(run["startup_seconds"] for run in runs),
        "startup": [  # each run's start-up, in minutes since time 0
            {"from_minute": _minutes(run["started_at"], start), "to_minute": _minutes(run["ready_at"], start)}
            for run in runs
            if run["ready_at"]
        ],
        "points": points,
    }


def _minutes(stamp: str, start: float) -> float:
    return round((datetime.fromisoformat(stamp).timestamp() - start) / 60, 3)


CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; background: #fafafa; }
h1 { margin: 0 0 4px; font-size: 22px; } h2 { font-size: 17px; margin: 28px 0 8px; }
.status { display: inline-block; padding: 1px 8px; border-radius: 10px; background: #ddd; }
.status-complete { background: #cfe8d0; } .status-incomplete, .status-running { background: #f3e2b3; }
#counts { display: flex; flex-wrap: wrap; gap: 10px; margin: 14px 0; }
#counts div { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 6px 12px; }
#counts .value { display: block; font-size: 20px; font-weight: 600; }
#counts .label { color: #666; font-size: 12px; }
#counts .ok .value { color: #2f6b34; } #counts .error .value { color: #9c3b2f; }
.sheet { display: grid; grid-template-columns: repeat(auto-fill, minmax(112px, 1fr)); gap: 8px; }
#contact-sheet figure { margin: 0; background: #fff; border: 1px solid #ddd; padding: 4px;
  text-align: center; min-width: 0; break-inside: avoid; }
#contact-sheet img { width: 96px; height: 96px; object-fit: contain; display: block; margin: 0 auto;
  image-rendering: pixelated; }
#contact-sheet figcaption { font-size: 11px; line-height: 1.3; color: #555; overflow: hidden;
  display: -webkit-box; -webkit-box-orient: vertical; -webkit-line-clamp: 3; overflow-wrap: anywhere; }
#contact-sheet h3 { font-size: 14px; margin: 12px 0 6px; }
.wide { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; background: #fff; }
th, td { border: 1px solid #ddd; padding: 4px 10px; text-align: left; vertical-align: top; }
td { overflow-wrap: break-word; } td.num { text-align: right; } .none { color: #666; font-style: italic; }
section.empty h2 { font-size: 14px; font-weight: normal; margin: 10px 0; }
svg { max-width: 100%; height: auto; } svg text { font-size: 11px; fill: #444; }
@media (max-width: 500px) { body { margin: 12px; } }
"""


def _cost_tiles(cost: dict[str, Any] | None) -> list[tuple[str, str, str]]:
    """The device time, written as `imagemill status` writes it, and, with a price, the cost and $ per
    1,000 images (imagemill.core.cost)."""
    if not cost or not cost["device_seconds"]:
        return []
    tiles = [("device time", device_time(cost["device_seconds"], cost["device_kinds"]), "")]
    if cost["cost_usd"] is not None:
        tiles.append(("cost", f"${cost['cost_usd']:.4f}", ""))
    if cost["usd_per_1000_images"] is not None:
        tiles.append(("$ / 1,000 images", f"${cost['usd_per_1000_images']:.4f}", ""))
    if cost["failed_attempts"]:
        spent = device_time(cost["failed_device_seconds"], cost["device_kinds"])
        tiles.append((f"in {cost['failed_attempts']} failed attempts", spent, "error"))
    return tiles


def render_html(report: dict[str, Any], thumbnails: list[str]) -> str:
    counts = report["counts"]
    tiles = [
        ("rows total", counts["rows_total"], ""),
        ("rows done", counts["rows_done"], ""),
        ("ok rows (images)", counts["rows_ok"], "ok"),
        ("filtered rows", counts["rows_filtered"], ""),
        ("flagged rows (safety)", counts["rows_flagged"], ""),
        ("error rows", counts["rows_error"], "error" if counts["rows_error"] else ""),
        *(
            [("watermark unreadable", unreadable, "error" if unreadable else "")]
            if (unreadable := counts["rows_watermark_unreadable"])
            else []
        ),
        ("shards done", f"{counts['shards_done']} / {counts['shards_total']}", ""),
        ("failed shards", counts["shards_failed"], "error" if counts["shards_failed"] else ""),
        *_cost_tiles(report.get("cost")),
    ]
    counts_html = "".join(
        f'<div class="{kind}" id="count-{_slug(label)}"><span class="value">{_e(value)}</span>'
        f'<span class="label">{_e(label)}</span></div>'
        for label, value, kind in tiles
    )
    name, status = report["name"], report["status"]
    errors, failed = _error_rows(report), [tuple(f.values()) for f in report["failed_shards"]]
    sections = [
        _section("samples", f"Samples ({len(thumbnails)})", _samples(report["samples"], thumbnails), "none"),
        _labels_section(report["labels"]),
        _section("throughput", "Throughput", _throughput(report["throughput"]), "no shard finished yet"),
        _section(
            "clip-score",
            "CLIP score (100 × cosine)",
            _score_chart(report["clip_score"]),
            "not scored (no scoring section in the job spec)",
        ),
        _section("errors", "Error rows by reason", _table(("reason", "rows", "examples"), errors), "none"),
        _section("failures", "Failed shards", _table(("shard", "file", "attempts", "error"), failed), "none"),
        _dataset(report.get("dataset")),
        _section(
            "stages",
            "Time by stage (seconds, summed over shards)",
            _stages(report["model_busy_share"], report["stage_seconds"]),
            "no stage split in these shards' stats",
        ),
    ]
    sections_html = "\n".join(section for section in sections if section)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy"
 content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<title>{_e(name)}: imagemill report</title><style>{CSS}</style></head>
<body>
<header id="job"><h1>{_e(name)} <span class="status status-{_slug(status)}">{_e(status)}</span></h1>
<div>{_e(_when(report))}</div>
<div id="counts">{counts_html}</div></header>
<section id="runs"><h2>Runs ({len(report["runs"])})</h2>
{_table(("run", "started", "start-up", "ended", "how it ended", "images"), _run_rows(report["runs"]))}
</section>
{sections_html}
</body></html>
"""


def _section(section_id: str, title: str, body: str | None, empty: str) -> str:
    """A section, or, where it has nothing to show, one line that says so (not an empty block)."""
    if not body:
        return (
            f'<section id="{section_id}" class="empty"><h2>{_e(title)}: '
            f'<span class="none">{_e(empty)}</span></h2></section>'
        )
    return f'<section id="{section_id}"><h2>{_e(title)}</h2>\n{body}</section>'


def _samples(samples: list[dict[str, Any]], thumbnails: list[str]) -> str | None:
    """The contact sheet: each thumbnail over its prompt (clipped to three lines; whole in the title),
    in one grid, or in one row per label for a labelled job."""
    figures = [
        f'<figure><img src="{_e(uri)}" alt="{_e(s["id"])}" '
        f'title="{_e(" · ".join(str(s[k]) for k in SAMPLE_HOVER if k in s))}">'
        f'<figcaption title="{_e(s["prompt"] or "")}">{_e(s["prompt"] or s["id"])}</figcaption></figure>'
        for s, uri in zip(samples, thumbnails, strict=True)
    ]
    if not figures:
        return None
    if not any("label" in s for s in samples):
        return f'<div id="contact-sheet" class="sheet">{"".join(figures)}</div>'
    by_label: dict[str, list[str]] = {}
    for s, figure in zip(samples, figures, strict=True):
        by_label.setdefault(s.get("label", "(no label)"), []).append(figure)
    rows = "".join(
        f'<div class="label-row"><h3>{_e(label)}</h3><div class="sheet">{"".join(shown)}</div></div>'
        for label, shown in sorted(by_label.items())
    )
    return f'<div id="contact-sheet">{rows}</div>'


def _run_rows(runs: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    def when(stamp: str | None) -> str:
        return _clock(stamp) if stamp else "-"

    def took(seconds: float | None) -> str:
        return duration(seconds) if seconds is not None else "-"

    return [
        (n, when(run["started_at"]), took(run["startup_seconds"]), when(run["ended_at"]), run["status"],
         run["images"])
        for n, run in enumerate(runs, 1)
    ]  # fmt: skip


def _throughput(series: dict[str, Any]) -> str | None:
    if not series["points"]:
        return None
    return f"<p>{_e(_rates(series))}</p>\n{_chart(series['points'], series['startup'])}"


def _stages(share: float | None, stages: dict[str, float]) -> str | None:
    if not stages:
        return None
    table = _table(("stage", "seconds"), [(STAGE_LABELS.get(s, s), v) for s, v in stages.items()])
    return f'<p id="model-busy">{_busy(share)}</p>\n{table}'


def _clock(stamp: str) -> str:
    """An ISO stamp as a person reads it: to the second, in UTC."""
    return f"{datetime.fromisoformat(stamp).astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"


def duration(seconds: float) -> str:
    """`42 s`, `9 min 29 s`, `2 h 5 min`."""
    whole = round(seconds)
    if whole < 60:
        return f"{seconds:.3g} s" if seconds < 10 else f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s"
    return f"{whole // 3600} h {whole % 3600 // 60} min"


def _when(report: dict[str, Any]) -> str:
    """`started …, ran 10 min 0 s`; after a resume `2 runs, 12 min 3 s in all, the first started …`."""
    ran = report["duration_seconds"]
    runs = len(report["runs"])
    if runs == 1:
        return f"started {_clock(report['started_at'])}, " + (
            f"ran {duration(ran)}" if ran is not None else "not ended"
        )
    return f"{runs} runs, {duration(ran or 0)} in all, the first started {_clock(report['started_at'])}"


def _rates(series: dict[str, Any]) -> str:
    runs = f"{series['runs']} runs'" if series["runs"] > 1 else "the run's"
    text = (
        f"{series['generation_images_per_second']:g} images/s while generating "
        f"({duration(series['generation_seconds'])}: {runs} time from start-up's end to the last commit)"
    )
    if series["wall_clock_seconds"]:
        text += (
            f"; {series['wall_clock_images_per_second']:g} images/s over the whole "
            + ("job" if series["runs"] == 1 else f"{series['runs']} runs")
            + f" ({duration(series['wall_clock_seconds'])})"
        )
    if series["startup_seconds"] is not None:
        text += f". Start-up (until the first worker was ready): {duration(series['startup_seconds'])}"
        text += " in all." if series["runs"] > 1 else "."
    return text


def _error_rows(report: dict[str, Any]) -> list[tuple[Any, ...]]:
    examples = report["error_examples"]
    return [
        (reason, count, " | ".join(examples.get(reason, [])))
        for reason, count in report["errors_by_reason"].items()
    ]


def _dataset_json(results: EvaluationResults | None) -> dict[str, Any] | None:
    """imagemill.evaluation.post_pass's numbers as report.json holds them; None without evaluation:."""
    return None if results is None else results.model_dump(mode="json")


def _dataset(dataset: dict[str, Any] | None) -> str:
    """The dataset section (report_dataset.py), absent for a job without evaluation."""
    tables = dataset_tables(dataset_results(dataset))
    if not tables:
        return ""
    body = "".join(
        f"<h3>{_e(caption)}</h3>{_table(header, rows) or NONE}" for caption, header, rows in tables
    )
    return f'<section id="dataset"><h2>Dataset</h2>{body}</section>'


def _labels_section(labels: dict[str, dict[str, int]]) -> str:
    """Rows per label (up to LABELS_SHOWN, then how many more); nothing for a job without labels."""
    if not labels:
        return ""
    rows = [(label, *(counts[status] for status in STATUSES)) for label, counts in labels.items()]
    more = len(rows) - LABELS_SHOWN
    note = f'<p class="none">… and {more} more labels (all in report.json)</p>' if more > 0 else ""
    table = _table(("label", *STATUSES), rows[:LABELS_SHOWN])
    return f'<section id="labels"><h2>Rows by label</h2>\n{table}{note}</section>'


def _busy(share: float | None) -> str:
    if share is None:
        return "No stage split in these shards' stats."
    return (
        f"The model worked {100 * share:.1f}% of the time shards held it. Stages overlap (a shard is "
        "read while another holds the model; writer threads run beside it), so they add up to more "
        "than the job's wall time."
    )


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def _slug(value: Any) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(value).lower()).strip("-")


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    """A table, scrolled within its own box where it is wider than the page (a phone); "" for no rows
    (its section then says none in one line)."""
    if not rows:
        return ""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{_e(v)}</td>' if isinstance(v, int | float) else f"<td>{_e(v)}</td>"
            for v in row
        )
        + "</tr>"
        for row in rows
    )
    return f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _chart(
    points: list[dict[str, Any]], startup: list[dict[str, float]], width: int = 720, height: int = 260
) -> str:
    """Cumulative images against the time since the start (seconds for a short job, else minutes), as
    an inline SVG polyline over each run's start-up, a shaded band labelled `start-up`."""
    left, right, top, bottom = 60, 20, 10, 40
    last = max([points[-1]["minute"], *(band["to_minute"] for band in startup)])
    in_seconds = last * 60 < SECONDS_AXIS_UNTIL
    unit, scale = ("seconds", 60) if in_seconds else ("minutes", 1)
    points = [{**p, "minute": p["minute"] * scale} for p in points]  # x in the axis' unit
    max_x = last * scale or 1.0
    max_y = points[-1]["images"] or 1
    x = [left + p["minute"] / max_x * (width - left - right) for p in points]
    bands = "".join(
        f'<rect class="startup" x="{left + a:.1f}" y="{top}" width="{max(b - a, 1):.1f}" '
        f'height="{height - top - bottom}" fill="#e9e2cf"><title>start-up, run {n}</title></rect>'
        f'<text class="startup-label" x="{left + a + 3:.1f}" y="{top + 12}">start-up</text>'
        for n, band in enumerate(startup, 1)
        for a, b in [(band[k] * scale / max_x * (width - left - right) for k in ("from_minute", "to_minute"))]
    )
    y = [height - bottom - p["images"] / max_y * (height - top - bottom) for p in points]
    line = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(x, y, strict=True))
    x_axis, y_axis = height - bottom, left
    return f"""<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img"
 aria-label="cumulative images over time">
{bands}
<line x1="{y_axis}" y1="{x_axis}" x2="{width - right}" y2="{x_axis}" stroke="#888"/>
<line x1="{y_axis}" y1="{top}" x2="{y_axis}" y2="{x_axis}" stroke="#888"/>
<polyline fill="none" stroke="#3b6ea8" stroke-width="2" points="{line}"/>
<text x="{y_axis}" y="{x_axis + 14}" text-anchor="middle">0</text>
<text x="{(left + width - right) / 2}" y="{x_axis + 14}" text-anchor="middle">{max_x / 2:.3g}</text>
<text x="{width - right}" y="{x_axis + 14}" text-anchor="end">{max_x:.3g}</text>
<text x="{y_axis - 6}" y="{x_axis}" text-anchor="end">0</text>
<text x="{y_axis - 6}" y="{(top + x_axis) / 2 + 4}" text-anchor="end">{max_y / 2:g}</text>
<text x="{y_axis - 6}" y="{top + 10}" text-anchor="end">{max_y}</text>
<text class="x-label" x="{(left + width - right) / 2}" y="{height - 6}" text-anchor="middle"
 >{unit} since start</text>
<text class="y-label" transform="translate(14 {(top + x_axis) / 2}) rotate(-90)" text-anchor="middle"
 >images (cumulative)</text>
</svg>"""


def _score_chart(scores: dict[str, Any] | None, width: int = 720, height: int = 220) -> str:
    """The score histogram as inline SVG bars, every bin from the lowest to the highest non-empty one,
    with the threshold as a red line where the job has one."""
    if scores is None:
        return ""
    left, right, top, bottom = 50, 20, 10, 40
    step = scores["bin_width"]
    low, high = scores["bins"][0]["low"], scores["bins"][-1]["high"]
    threshold = scores["threshold"]
    if threshold is not None:  # keep the line on the chart
        low = min(low, math.floor(threshold / step) * step)
        high = max(high, math.floor(threshold / step) * step + step)
    counts = {b["low"]: b["count"] for b in scores["bins"]}
    n_bins = round((high - low) / step)
    tallest = max(counts.values())
    plot_w, plot_h = width - left - right, height - top - bottom
    bar_w = plot_w / n_bins
    bars = []
    for i in range(n_bins):
        edge = low + i * step
        count = counts.get(edge, 0)
        bar_h = count / tallest * plot_h
        bars.append(
            f'<rect class="bin" x="{left + i * bar_w:.1f}" y="{top + plot_h - bar_h:.1f}" '
            f'width="{max(bar_w - 1, 1):.1f}" height="{bar_h:.1f}" fill="#3b6ea8">'
            f"<title>{_e(f'{edge:g} to {edge + step:g}: {count}')}</title></rect>"
        )
    line = ""
    if threshold is not None:
        x = left + (threshold - low) / (high - low) * plot_w
        line = (
            f'<line class="threshold" x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + plot_h}" '
            f'stroke="#c0392b" stroke-width="2"/>'
        )
    least, mean, most = (f"{scores[key]:.2f}" for key in ("min", "mean", "max"))
    summary = f"{scores['count']} scored, mean {mean}, min {least}, max {most}"
    if threshold is not None:
        summary += f"; threshold {threshold:g} (low-scoring images: {scores['on_low_score']})"
    axis = top + plot_h
    return f"""<p>{_e(summary)}</p>
<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="score histogram">
<line x1="{left}" y1="{axis}" x2="{width - right}" y2="{axis}" stroke="#888"/>
{"".join(bars)}{line}
<text x="{left}" y="{axis + 14}" text-anchor="middle">{low:g}</text>
<text x="{width - right}" y="{axis + 14}" text-anchor="end">{high:g}</text>
<text x="{left - 6}" y="{top + 10}" text-anchor="end">{tallest}</text>
<text x="{(left + width - right) / 2}" y="{height - 6}" text-anchor="middle">score</text>
</svg>"""
