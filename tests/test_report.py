"""The job report, from a fake output folder: report.json's numbers, escaping, and a real browser render.

The folder holds only `_job.json` and `shards/*.json` (no images/), as a job's output seen by the
driver: the report must be built from those alone. The render test uses Debian's `chromium` package.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagemill.core.images import thumbnail_data_uri
from imagemill.core.job_record import JobRecord, write_job_record
from imagemill.core.layout import JOB_RECORD, OutputLayout
from imagemill.core.records import PROMPT_CHARS, ClipScoreSummary, ShardStats, commit_shard
from imagemill.core.write_gate import OwnedOutput
from imagemill.reporting.report import write_report

START = datetime(2025, 1, 1, tzinfo=UTC)
HOSTILE_PROMPT = "<script>alert(1)</script> a \"quoted\" & 'single' cat"
HOSTILE_ID = 'id"><img src=x onerror=alert(2)>'
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
THUMB_SIDE = 72


def solid(colour: tuple[int, int, int]) -> str:
    return thumbnail_data_uri(np.full((THUMB_SIDE, THUMB_SIDE, 3), colour, dtype=np.uint8))


def sample(row_id: str, prompt: str, seed: int, colour: tuple[int, int, int]) -> dict:
    return {"id": row_id, "prompt": prompt, "seed": seed, "thumbnail": solid(colour)}


def shard(shard_id, finished_s, seconds, rows, ok, errors, samples):
    return {
        "shard_id": shard_id,
        "run_id": "run-1",
        "input_file": f"s3://bucket/prompts/{shard_id.split('-')[0]}.parquet",
        "rows": rows,
        "ok": ok,
        "error": rows - ok,
        "errors_by_reason": errors,
        "finished_at": (START + timedelta(seconds=finished_s)).isoformat(),
        "seconds": seconds,
        "write_wait_seconds": 2.0,
        "stage_seconds": {
            "read": 1.0,
            "text_encode": 1.0,
            "denoise": seconds - 8.0,
            "decode": 2.0,
            "image_encode": 3.0,
            "upload": 0.5,
            "idle": 1.0,
        },
        "images_per_second": round(ok / seconds, 3),
        "device": "cpu",
        "samples": samples,
    }


SHARDS = [
    shard(
        "a-rg0-1",
        90,
        60.0,
        10,
        8,
        {"invalid_prompt": 2},
        [sample("a-0", HOSTILE_PROMPT, 11, RED), sample("a-1", "a green field", 12, GREEN)],
    ),
    shard(
        "a-rg1-2",
        180,
        80.0,
        10,
        10,
        {},
        [sample("a-10", "a blue sea", 13, BLUE), sample("a-11", "dusk", 14, (200, 120, 40))],
    ),
    shard(
        "b-rg0-1",
        250,
        70.0,
        10,
        9,
        {"duplicate_id": 1},
        [
            sample("猫-☕ café", "ünïcødé 猫 prompt", 15, (90, 60, 150)),
            sample(HOSTILE_ID, "x", 16, (30, 130, 120)),
        ],
    ),
    shard("b-rg1-2", 599, 90.0, 10, 10, {}, [sample("b-10", "last", 17, (120, 120, 120))]),
]
FAILED = {
    "shard_id": "c-rg0-1",
    "input_file": "s3://bucket/prompts/c.parquet",
    "attempts": 3,
    "error": "OSError: <boom> & 'quoted'",
}
ALL_SAMPLES = [(s["shard_id"], x) for s in SHARDS for x in s["samples"]]


def make_output(folder: Path, shards=SHARDS, record_extra=None) -> OwnedOutput:
    (folder / "shards").mkdir(parents=True)
    record = {
        "name": "nightly <b>&",
        "spec": {"name": "nightly <b>&"},
        "fingerprint": {},
        "versions": {"python": "3.11"},
        "started_at": START.isoformat(),
        "ready_at": (START + timedelta(seconds=20)).isoformat(),
        "ended_at": (START + timedelta(seconds=600)).isoformat(),
        "status": "incomplete",
        "shards_total": 5,
        "shards_done": 4,
        "rows_total": 50,
        "rows_ok": 37,
        "rows_error": 3,
        "errors_by_reason": {"invalid_prompt": 2, "duplicate_id": 1},
        "failed_shards": [FAILED],
        "input_rows": 50,
        "input_files": 3,
        "input_footers": {f"s3://bucket/prompts/{name}.parquet": "footer" for name in "abc"},
        "run_id": "run-1",
    } | (record_extra or {})
    output = OwnedOutput.unleased(OutputLayout(str(folder)))
    # Through the models, as imagemill writes them: a fixture that is no valid record fails here.
    write_job_record(output, JobRecord.model_validate_json(json.dumps(record)))
    for stats in shards:
        stats = ShardStats.model_validate_json(json.dumps(stats))
        commit_shard(output.attempt(stats.shard_id), stats)
    return output


def test_report_json_and_escaped_html(tmp_path, monkeypatch):
    output = make_output(tmp_path)
    opened: list[str] = []  # paths opened for reading
    for method in ("open", "cat_file"):
        original = getattr(output.layout.fs, method)

        def spy(path, *args, _original=original, _method=method, **kwargs):
            if _method == "cat_file" or "w" not in (args[0] if args else kwargs.get("mode", "rb")):
                opened.append(str(path))
            return _original(path, *args, **kwargs)

        monkeypatch.setattr(output.layout.fs, method, spy)

    report = write_report(output)

    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert report["name"] == "nightly <b>&" and report["status"] == "incomplete"
    assert report["counts"] == {
        "rows_total": 50,
        "rows_done": 40,
        "rows_ok": 37,
        "rows_filtered": 0,
        "rows_flagged": 0,
        "rows_watermark_unreadable": 0,
        "candidates_rejected": 0,
        "rows_error": 3,
        "shards_total": 5,
        "shards_done": 4,
        "shards_failed": 1,
    }
    assert report["clip_score"] is None  # the job does not score
    assert report["errors_by_reason"] == {"duplicate_id": 1, "invalid_prompt": 2}
    assert report["failed_shards"] == [FAILED]
    # summed over the shards, in pipeline order; no total, since shards and writer threads overlap
    assert report["stage_seconds"] == {
        "read": 4.0,
        "text_encode": 4.0,
        "denoise": 268.0,
        "decode": 8.0,
        "image_encode": 12.0,
        "upload": 2.0,
        "idle": 4.0,
    }
    assert report["model_busy_share"] == round(280 / 284, 4)

    series = report["throughput"]
    assert series["start"] == START.isoformat() and series["bucket_seconds"] == 10
    points = series["points"]
    assert points[0] == {"minute": 0.0, "images": 0, "images_per_second": 0.0}
    assert len(points) == 61 and points[-1]["minute"] == 10.0 and points[-1]["images"] == 37
    for i, point in enumerate(points[1:], 1):  # cumulative images: shards finished before the bucket's end
        end = START + timedelta(seconds=10 * i)
        assert point["minute"] == round(10 * i / 60, 3)
        assert point["images"] == sum(
            s["ok"] for s in SHARDS if datetime.fromisoformat(s["finished_at"]) < end
        )
    assert [p["images"] for p in points if p["images_per_second"]] == [8, 18, 27, 37]
    assert sum(p["images_per_second"] * 10 for p in points) == pytest.approx(37)
    assert series["images_per_second"] == pytest.approx(37 / 599, abs=1e-3)

    assert report["samples"] == [
        {"id": x["id"], "prompt": x["prompt"], "seed": x["seed"], "shard_id": shard_id}
        for shard_id, x in ALL_SAMPLES
    ]
    assert "thumbnail" not in json.dumps(report)

    html = (tmp_path / "report.html").read_text()
    assert "<script" not in html.lower() and "alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<img src=x" not in html and "<b>&" not in html
    assert "http://" not in html and "https://" not in html  # nothing fetched from anywhere
    assert html.count('<img src="data:image/jpeg;base64,') == len(ALL_SAMPLES)
    assert 'id="contact-sheet"' in html and 'id="throughput"' in html and "<polyline" in html
    stages = html.split('id="stages"', 1)[1].split("</section>", 1)[0]
    assert "worked 98.6% of the time" in stages
    assert '<td>denoising (model)</td><td class="num">268.0</td>' in stages

    assert not (tmp_path / "images").exists()
    # the driver read the job record and the shards' stats, and nothing else (no image, no metadata)
    allowed = {str(tmp_path / JOB_RECORD)} | {
        str(tmp_path / "shards" / f"{s['shard_id']}.json") for s in SHARDS
    }
    assert opened and {path.removeprefix("file://") for path in opened} <= allowed, opened


def _summary(scores: list[float]) -> dict | None:
    summary = ClipScoreSummary.of(scores)
    return summary and summary.model_dump()


def test_score_distribution_is_summed_from_the_shards_histograms(tmp_path):
    """Each shard's stats carry its scores' summary (as the actor writes it); the report adds them up
    bin by bin, and the page draws one bar per bin from the lowest to the highest, and the threshold."""
    per_shard = [[12.5, 30.2, 30.9, -3.0], [30.0, 31.99, 12.0], [], [45.0]]
    shards = [
        {**stats, "filtered": sum(score < 30 for score in scores), "clip_score": _summary(scores)}
        for stats, scores in zip(SHARDS, per_shard, strict=True)
    ]
    spec = {"name": "scored", "scoring": {"threshold": 30.0, "on_low_score": "drop"}}
    report = write_report(make_output(tmp_path, shards, {"spec": spec}))

    scores = [score for shard_scores in per_shard for score in shard_scores]
    distribution = report["clip_score"]
    assert {key: distribution[key] for key in ("count", "min", "max", "threshold", "on_low_score")} == {
        "count": 8,
        "min": -3.0,
        "max": 45.0,
        "threshold": 30.0,
        "on_low_score": "drop",
    }
    assert distribution["mean"] == pytest.approx(sum(scores) / len(scores), abs=1e-4)
    assert [(b["low"], b["high"], b["count"]) for b in distribution["bins"]] == [
        (-3.0, -2.0, 1),
        (12.0, 13.0, 2),
        (30.0, 31.0, 3),
        (31.0, 32.0, 1),
        (45.0, 46.0, 1),
    ]
    assert report["counts"]["rows_filtered"] == 3

    html = (tmp_path / "report.html").read_text()
    section = html.split('id="clip-score"', 1)[1].split("</section>", 1)[0]
    assert section.count('<rect class="bin"') == 46 - (-3)  # every bin between, empty ones too
    assert section.count('class="threshold"') == 1 and "8 scored, mean" in section
    assert 'id="count-filtered-rows"' in html


@pytest.mark.parametrize(("placement", "busy"), [("actor", 280 + 20), ("pool", 280)])
def test_prompt_expansion_is_model_work_on_the_actor_and_waiting_with_a_pool(tmp_path, placement, busy):
    """Each shard spent 5 s on expansion: running the language model on its device (actor), or
    waiting for the expander pool while it held the generator (pool)."""
    shards = [{**stats, "expand_seconds": 5.0} for stats in SHARDS]
    spec = {"name": "expanded", "expansion": {"placement": placement}}
    report = write_report(make_output(tmp_path / placement, shards, {"spec": spec}))
    assert list(report["stage_seconds"])[:2] == ["read", "expand"] and report["stage_seconds"]["expand"] == 20
    assert report["model_busy_share"] == round(busy / (280 + 20 + 4), 4)


def test_samples_are_spread_across_shards(tmp_path):
    output = make_output(tmp_path)
    picked = write_report(output, max_samples=3)["samples"]
    assert [s["shard_id"] for s in picked] == ["a-rg0-1", "a-rg1-2", "b-rg0-1"]
    assert write_report(output, max_samples=3)["samples"] == picked  # deterministic
    picked = write_report(output, max_samples=5)["samples"]  # one of each shard, then second ones
    assert sorted({s["shard_id"] for s in picked}) == [s["shard_id"] for s in SHARDS]
    assert write_report(output, max_samples=0)["samples"] == []
    html = (tmp_path / "report.html").read_text()
    assert '<section id="samples" class="empty"><h2>Samples (0): <span class="none">none' in html


def test_running_job_without_shards(tmp_path):
    extra = {"status": "running", "failed_shards": [], "ended_at": None}
    output = make_output(tmp_path, shards=[], record_extra=extra)
    report = write_report(output)
    assert report["counts"]["rows_done"] == 0 and report["counts"]["shards_failed"] == 0
    assert report["throughput"]["points"] == [] and report["samples"] == []
    html = (tmp_path / "report.html").read_text()
    failures = html.split('id="failures"', 1)[1].split("</section>", 1)[0]
    assert failures == ' class="empty"><h2>Failed shards: <span class="none">none</span></h2>'
    assert report["runs"][0]["status"] == "running" and report["runs"][0]["ended_at"] is None


# --- headless Chromium -------------------------------------------------------------------------------


class DomIndex(HTMLParser):
    """Tags, the text under each element id, and each img with the ids of the elements around it."""

    VOID = {"img", "meta", "br", "hr", "input", "link", "source", "col", "area", "base", "wbr"}

    def __init__(self, text: str):
        super().__init__()
        self.stack: list[tuple[str, str | None]] = []
        self.tags: list[tuple[str, set[str]]] = []
        self.starts: list[tuple[str, dict[str, str], set[str]]] = []  # every start tag, its attributes
        self.text: dict[str, str] = {}
        self.imgs: list[tuple[dict[str, str], set[str]]] = []
        self.feed(text)

    def _ids(self) -> set[str]:
        return {element_id for _, element_id in self.stack if element_id}

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.tags.append((tag, self._ids()))
        self.starts.append((tag, attributes, self._ids()))
        if tag == "img":
            self.imgs.append((attributes, self._ids()))
        if tag not in self.VOID:
            self.stack.append((tag, attributes.get("id")))

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, self._ids()))

    def handle_endtag(self, tag):
        while self.stack and self.stack.pop()[0] != tag:
            pass

    def handle_data(self, data):
        for element_id in self._ids():
            self.text[element_id] = self.text.get(element_id, "") + data


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    command = [
        shutil.which("chromium"),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=2000",
        *args,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    if shutil.which("chromium") is None:
        pytest.skip("needs Debian's chromium to render report.html (apt-get install -y chromium)")
    folder = tmp_path_factory.mktemp("report")
    write_report(make_output(folder / "out"))
    page = (folder / "out" / "report.html").as_uri()
    dom = chromium("--dump-dom", page, profile=folder / "profile-dom").stdout
    shot = folder / "shot.png"
    chromium(f"--screenshot={shot}", "--window-size=1200,1600", page, profile=folder / "profile-shot")
    return DomIndex(dom), shot


def test_browser_dom(rendered):
    dom, _ = rendered
    assert not [tag for tag, _ in dom.tags if tag == "script"]  # the hostile prompt and id stayed text
    sheet = [attributes for attributes, ids in dom.imgs if "contact-sheet" in ids]
    assert len(sheet) == len(dom.imgs) == len(ALL_SAMPLES)
    assert all(img["src"].startswith("data:image/jpeg;base64,") for img in sheet)
    # what the browser parsed back is exactly the original text: escaped once, correctly
    assert [img["title"] for img in sheet] == [
        f"{x['id']} · {x['seed']} · {x['prompt']}" for _, x in ALL_SAMPLES
    ]
    # each caption is its prompt, whole in its title (the page clips it to three lines)
    captions = [attributes["title"] for tag, attributes, _ in dom.starts if tag == "figcaption"]
    assert captions == [x["prompt"] for _, x in ALL_SAMPLES]
    assert HOSTILE_PROMPT in dom.text["contact-sheet"] and "ünïcødé 猫 prompt" in dom.text["contact-sheet"]
    assert "37" in dom.text["count-ok-rows-images"] and "ok rows" in dom.text["count-ok-rows-images"]
    assert "3" in dom.text["count-error-rows"] and "error rows" in dom.text["count-error-rows"]
    assert "40" in dom.text["count-rows-done"] and "4 / 5" in dom.text["count-shards-done"]
    assert "invalid_prompt" in dom.text["errors"] and "duplicate_id" in dom.text["errors"]
    assert "c-rg0-1" in dom.text["failures"] and "OSError: <boom> & 'quoted'" in dom.text["failures"]
    assert [tag for tag, ids in dom.tags if tag == "polyline" and "throughput" in ids]
    assert "minutes since start" in dom.text["throughput"]


def test_browser_screenshot_shows_the_thumbnails(rendered):
    _, shot = rendered
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[0] >= 1000 and pixels.shape[1] >= 1000
    packed = (pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2]
    assert len(np.unique(packed)) > 50  # not blank: text, borders, chart and thumbnails
    for colour in (RED, GREEN, BLUE):  # each solid thumbnail was decoded and painted
        close = (np.abs(pixels - np.array(colour)).max(axis=2) < 40).sum()
        assert close >= 0.8 * THUMB_SIDE * THUMB_SIDE, (colour, close)


# --- read by a person ----------------------------------------------------------------------------------


def test_times_read_as_a_clock_and_durations(tmp_path):
    """No microsecond ISO stamps on the page: the start to the second, and how long it ran."""
    started = START + timedelta(microseconds=123456)
    extra = {"started_at": started.isoformat(), "ended_at": (started + timedelta(seconds=600)).isoformat()}
    report = write_report(make_output(tmp_path, record_extra=extra))
    assert report["duration_seconds"] == 600.0
    header = (tmp_path / "report.html").read_text().split('id="job"', 1)[1].split("</header>", 1)[0]
    assert "started 2025-01-01 00:00:00 UTC, ran 10 min 0 s" in header
    assert "123456" not in header and "+00:00" not in header


def test_throughput_over_the_generation_window_beside_the_wall_clock(tmp_path):
    """The job ran 600 s; its first worker was ready at 20 s, and it generated from then to its last
    commit (599 s): 37 images over 579 s, beside 37 over the 600 s of the whole job."""
    report = write_report(make_output(tmp_path))
    series = report["throughput"]
    assert series["generation_seconds"] == 579.0 and series["startup_seconds"] == 20.0
    assert series["generation_images_per_second"] == pytest.approx(37 / 579, abs=1e-3)
    assert series["wall_clock_seconds"] == 600.0
    assert series["wall_clock_images_per_second"] == pytest.approx(37 / 600, abs=1e-3)
    section = (tmp_path / "report.html").read_text().split('id="throughput"', 1)[1].split("</section>", 1)[0]
    assert "0.064 images/s while generating (9 min 39 s: the run&#x27;s time" in section
    assert "Start-up (until the first worker was ready): 20 s." in section
    assert "0.062 images/s over the whole job (10 min 0 s)" in section
    assert "minutes since start" in section


def test_a_short_job_has_its_time_axis_in_seconds(tmp_path):
    shards = [
        shard("a-rg0-1", 12, 10.0, 10, 10, {}, []),
        shard("a-rg1-2", 25, 12.0, 10, 10, {}, []),
        shard("b-rg0-1", 40, 14.0, 10, 10, {}, []),
    ]
    extra = {"ended_at": (START + timedelta(seconds=41)).isoformat(), "failed_shards": []}
    report = write_report(make_output(tmp_path, shards, extra))
    assert report["throughput"]["bucket_seconds"] == 1
    section = (tmp_path / "report.html").read_text().split('id="throughput"', 1)[1].split("</section>", 1)[0]
    assert "seconds since start" in section and "minutes since start" not in section
    assert '<text x="700" y="234" text-anchor="end">40</text>' in section  # the axis ends at 40 s


def test_small_thumbnails_are_enlarged_pixelated(tmp_path):
    tiny = {"id": "t-0", "prompt": "a red circle", "seed": 1, "thumbnail": thumbnail_data_uri(
        np.full((32, 32, 3), RED, dtype=np.uint8))}  # fmt: skip
    write_report(make_output(tmp_path, [shard("a-rg0-1", 90, 60.0, 10, 10, {}, [tiny])]))
    html = (tmp_path / "report.html").read_text()
    rule = html.split("#contact-sheet img {", 1)[1].split("}", 1)[0]
    assert "image-rendering: pixelated" in rule and "width: 96px" in rule and "height: 96px" in rule


def test_error_reasons_come_with_example_messages(tmp_path):
    examples = [
        {"invalid_prompt": ["invalid_prompt: prompt is null"], "model_rejected": ["model_rejected: <size>"]},
        {"invalid_prompt": ["invalid_prompt: prompt is empty", "invalid_prompt: prompt is not a string"]},
    ]
    counts = [{"invalid_prompt": 1, "model_rejected": 1}, {"invalid_prompt": 3}]
    shards = [
        {
            **stats,
            "ok": stats["rows"] - sum(errors.values()),
            "errors_by_reason": errors,
            "error_examples": found,
        }
        for stats, errors, found in zip(SHARDS[:2], counts, examples, strict=True)
    ]
    report = write_report(make_output(tmp_path, shards))
    assert report["errors_by_reason"] == {"invalid_prompt": 4, "model_rejected": 1}
    assert report["error_examples"] == {
        "invalid_prompt": ["invalid_prompt: prompt is null", "invalid_prompt: prompt is empty"],
        "model_rejected": ["model_rejected: <size>"],
    }
    section = (tmp_path / "report.html").read_text().split('id="errors"', 1)[1].split("</section>", 1)[0]
    assert "<th>examples</th>" in section and "invalid_prompt: prompt is empty" in section
    assert "model_rejected: &lt;size&gt;" in section


def test_a_huge_prompt_does_not_make_a_huge_report(tmp_path):
    huge = "a cat " * 200_000  # 1.2 MB
    write_report(make_output(tmp_path, [shard("a-rg0-1", 90, 60.0, 10, 10, {}, [sample("h", huge, 1, RED)])]))
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["samples"][0]["prompt"]) <= PROMPT_CHARS + 1 and report["samples"][0][
        "prompt"
    ].endswith("…")
    assert (tmp_path / "report.html").stat().st_size < 50_000


def test_a_shards_stats_keep_capped_prompts_and_a_few_error_messages():
    """What the actor writes for the report: sample prompts cut to PROMPT_CHARS, and per error reason
    up to two distinct messages, each cut as well."""
    from imagemill.core.shard import Shard
    from imagemill.workers.device_use import DeviceUse
    from imagemill.workers.rows import Row
    from imagemill.workers.shard_records import ShardRun

    def row(index: int, prompt, error: str | None = None) -> Row:
        return Row(
            index=index, input_row=index, row_id=f"r{index}", prompt=prompt, negative_prompt=None, seed=1,
            width=8, height=8, num_inference_steps=1, guidance_scale=1.0, error=error,
        )  # fmt: skip

    run = ShardRun(shard=Shard("s", "in.parquet", "in", 0, 1, 0, 5), model="tiny")
    long_error = "model_rejected: " + "z" * 1000
    run.rows = [
        row(0, "a cat " * 200_000),
        row(1, None, "invalid_prompt: prompt is null"),
        row(2, "", "invalid_prompt: prompt is empty"),
        row(3, 5, "invalid_prompt: prompt is not a string"),
        row(4, "ok", long_error),
    ]
    run.add_samples([(run.rows[0], np.zeros((8, 8, 3), dtype=np.uint8))], ThreadPoolExecutor(1).submit)
    stats = run.stats("cpu", None, DeviceUse("CPU", None, 1.0, None))
    assert stats.samples[0].prompt == ("a cat " * 50) + "…"
    assert stats.errors_by_reason == {"invalid_prompt": 3, "model_rejected": 1}
    assert stats.error_examples == {
        "invalid_prompt": ["invalid_prompt: prompt is null", "invalid_prompt: prompt is empty"],
        "model_rejected": [long_error[:PROMPT_CHARS] + "…"],
    }
