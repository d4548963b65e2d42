"""The report after a stop and a resume (issue #24 item 5, acceptance 4): totals and rates over every
run, each run listed, as a phone, a desktop and a printer show the page.

A labelled job of the demo model runs in process (the real driver: lease, claim, job record, report);
its first run is stopped by Ctrl-C after two commits, the same command then resumes it. Chromium lays
the report out at 390 and 1280 CSS pixels through the DevTools protocol (tests/browser.py) and prints
it. With IMAGEMILL_DOCS_SCREENSHOTS=1 the test also writes docs/report-390.png and docs/report-1280.png,
the screenshots docs/output.md shows.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zlib
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from browser import Browser
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import imagemill
from imagemill.core.cost import device_time
from imagemill.core.job_record import KILLED, JobRecord, write_job_record
from imagemill.core.layout import OutputLayout
from imagemill.core.records import ShardStats, commit_shard
from imagemill.core.write_gate import OwnedOutput
from imagemill.execution.executor import ShardWork
from imagemill.reporting.report import duration, write_report
from imagemill.reporting.status import job_status
from imagemill.testing.in_process import run_in_this_process

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = ROOT / "jobs" / "models" / "demo-shapes"
SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "yellow", "green", "blue", "purple")
PLACES = ("on the left", "on the right", "at the top", "at the bottom", "in the center")
ROWS, ROWS_PER_SHARD = 24, 4
WIDTHS = (390, 1280)


def _prompts(path: Path) -> None:
    """ROWS labelled prompts of the demo model's grammar, labels interleaved, a row group per shard."""
    shapes = [SHAPES[i % 3] for i in range(ROWS)]
    prompts = [
        f"a {COLOURS[i % 5]} {shape} {PLACES[i * 2 % 5]} on a white background"
        for i, shape in enumerate(shapes)
    ]
    table = pa.table({"id": [f"s{i:02d}" for i in range(ROWS)], "prompt": prompts, "label": shapes})
    pq.write_table(table, path, row_group_size=ROWS_PER_SHARD)


def _spec(tmp_path: Path):
    return imagemill.build_spec(
        {
            "name": "shapes, resumed",
            "input": {"path": str(tmp_path / "prompts.parquet"), "rows_per_shard": ROWS_PER_SHARD,
                      "carry_columns": ["label"]},
            "output": {"path": str(tmp_path / "out"), "image_format": "png"},
            "model": {"source": str(DEMO_MODEL)},
            "generation": {"width": 32, "height": 32, "num_inference_steps": 10, "guidance_scale": 3.0},
            "workers": {"num_workers": 1, "batch_size": 4},
        }
    )  # fmt: skip


def _stopped_after(commits: int):
    """The in-process executor, stopped by Ctrl-C once `commits` shards have committed (the shard the
    worker is still on then commits too, as an actor's does after `ray job stop`)."""

    def executor(work: ShardWork) -> None:
        seen = []

        def on_committed(stats) -> None:
            work.on_committed(stats)
            seen.append(stats.shard_id)
            if len(seen) == commits:
                raise KeyboardInterrupt

        run_in_this_process(replace(work, on_committed=on_committed))

    return executor


def _seconds(start: str, end: str) -> float:
    return datetime.fromisoformat(end).timestamp() - datetime.fromisoformat(start).timestamp()


@pytest.fixture(scope="module")
def resumed(tmp_path_factory) -> Path:
    """The output of the job, stopped after 2 of its 6 shards and run again to the end."""
    tmp_path = tmp_path_factory.mktemp("resumed")
    _prompts(tmp_path / "prompts.parquet")
    spec = _spec(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        imagemill.run(spec, progress=False, executor=_stopped_after(2))
    first = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [run["status"] for run in first["runs"]] == ["interrupted"]
    assert first["counts"]["shards_done"] < ROWS // ROWS_PER_SHARD, "the first run did every shard"
    assert imagemill.run(spec, progress=False, executor=run_in_this_process).complete
    return tmp_path / "out"


@pytest.mark.model
def test_the_report_after_a_resume_counts_every_run(resumed):
    report = json.loads((resumed / "report.json").read_text())
    shards = [json.loads(path.read_text()) for path in (resumed / "shards").glob("*.json")]
    runs = report["runs"]
    assert [run["status"] for run in runs] == ["interrupted", "complete"]
    assert len({run["run_id"] for run in runs}) == 2
    # each run's images are those of the shards it committed; together every image of the job
    for run in runs:
        assert run["images"] == sum(s["ok"] for s in shards if s["run_id"] == run["run_id"]) > 0
    assert sum(run["images"] for run in runs) == report["counts"]["rows_ok"] == ROWS

    # the rate is every image over the runs' generating time (start-up's end to the run's last
    # commit), summed: not the last run's wall time
    generating = []
    for run in runs:
        last = max(
            (s["finished_at"] for s in shards if s["run_id"] == run["run_id"]), key=datetime.fromisoformat
        )
        generating.append(_seconds(run["ready_at"], last))
        assert run["startup_seconds"] == pytest.approx(_seconds(run["started_at"], run["ready_at"]), abs=1e-3)
    series = report["throughput"]
    # times are kept to the millisecond, each run's then their sum: a rate is checked against the
    # report's own seconds (a millisecond off a 3 s wall moves the rate by 0.003)
    assert series["generation_seconds"] == pytest.approx(sum(generating), abs=1e-2)
    generation_rate = ROWS / series["generation_seconds"]
    assert series["generation_images_per_second"] == pytest.approx(generation_rate, abs=1e-3)
    wall = sum(_seconds(run["started_at"], run["ended_at"]) for run in runs)
    assert series["wall_clock_seconds"] == report["duration_seconds"] == pytest.approx(wall, abs=1e-2)
    wall_rate = ROWS / series["wall_clock_seconds"]
    assert series["wall_clock_images_per_second"] == pytest.approx(wall_rate, abs=1e-3)
    assert len(series["startup"]) == 2

    html = (resumed / "report.html").read_text()
    header = html.split('id="job"', 1)[1].split("</header>", 1)[0]
    assert f"2 runs, {duration(report['duration_seconds'])} in all" in header
    # one unit for device time: the report's tile says what `imagemill status` says
    cost = report["cost"]
    spent = device_time(cost["device_seconds"], cost["device_kinds"])
    assert f"cost:   {spent}" in job_status(str(resumed)).text()
    assert f'<span class="value">{spent}</span><span class="label">device time</span>' in html


def _layout(browser: Browser) -> dict:
    """What the test reads of the laid-out page: boxes (x, y, right, bottom) by selector, the
    elements wider than the window outside a scrolled table box, styles."""
    return browser.evaluate(
        """(() => {
  const box = e => { const r = e.getBoundingClientRect();
    return {x: r.left, y: r.top + scrollY, right: r.right, bottom: r.bottom + scrollY, h: r.height}; };
  const all = s => [...document.querySelectorAll(s)].map(box);
  return {
    width: innerWidth,
    scrollWidth: document.documentElement.scrollWidth,
    overflowing: [...document.querySelectorAll('body *')]
      .filter(e => !e.closest('.wide') && e.getBoundingClientRect().right > innerWidth + 0.5)
      .map(e => e.tagName + '#' + e.id + '.' + e.className),
    job: box(document.getElementById('job')),
    runs: box(document.getElementById('runs')),
    runRows: document.querySelectorAll('#runs tbody tr').length,
    samples: box(document.getElementById('samples')),
    throughput: box(document.getElementById('throughput')),
    empty: [...document.querySelectorAll('section.empty')].map(e => [e.id, box(e).h]),
    labelRows: [...document.querySelectorAll('.label-row')].map(row => ({
      label: row.querySelector('h3').textContent,
      box: box(row),
      figures: [...row.querySelectorAll('figure')].map(f => ({
        box: box(f), caption: f.querySelector('figcaption').textContent,
        title: f.querySelector('figcaption').title, captionHeight: box(f.querySelector('figcaption')).h})),
    })),
    chart: box(document.querySelector('#throughput svg')),
    bands: all('#throughput rect.startup'),
    bandLabels: [...document.querySelectorAll('#throughput text.startup-label')].map(t => t.textContent),
    errorColour: getComputedStyle(document.querySelector('#count-error-rows .value')).color,
    okColour: getComputedStyle(document.querySelector('#count-ok-rows-images .value')).color,
  };
})()"""
    )


def _check_layout(page: dict, width: int) -> None:
    assert page["width"] == width and page["scrollWidth"] <= width, page["scrollWidth"]
    assert page["overflowing"] == [], page["overflowing"]
    # top to bottom: the header, the runs, the samples, the throughput
    assert page["job"]["bottom"] <= page["runs"]["y"] < page["samples"]["y"] < page["throughput"]["y"]
    assert page["runRows"] == 2
    # one row per label, one under the other; each figure under its label, its caption the prompt
    rows = page["labelRows"]
    assert [row["label"] for row in rows] == list(SHAPES)
    for above, below in zip(rows, rows[1:], strict=False):
        assert above["box"]["bottom"] <= below["box"]["y"]
    for row in rows:
        assert row["figures"]
        for figure in row["figures"]:
            assert row["label"] in figure["caption"] and figure["caption"] == figure["title"]
            assert row["box"]["y"] < figure["box"]["y"] < row["box"]["bottom"]
            assert figure["box"]["right"] <= width and figure["captionHeight"] <= 3 * 11 * 1.3 + 1
        if width >= 1280:  # a desktop shows each label's samples side by side on one line
            assert len({round(figure["box"]["y"]) for figure in row["figures"]}) == 1
    # start-up: one shaded, labelled band per run, inside the chart, the chart inside the window
    assert len(page["bands"]) == 2 and page["bandLabels"] == ["start-up", "start-up"]
    chart = page["chart"]
    assert chart["right"] <= width
    for band in page["bands"]:
        assert chart["x"] <= band["x"] < band["right"] <= chart["right"]
    assert page["bands"][0]["right"] <= page["bands"][1]["x"]
    # 0 errors are not red; the empty sections are a line each, not a block
    assert page["errorColour"] != "rgb(156, 59, 47)" and page["okColour"] == "rgb(47, 107, 52)"
    assert {section for section, _ in page["empty"]} == {"clip-score", "errors", "failures"}
    assert all(height < 50 for _, height in page["empty"]), page["empty"]


def _pdf_text(pdf: bytes) -> str:
    """The text of a PDF that Chromium printed: each content stream's `<glyph ids> Tj` strings mapped
    through the ToUnicode map of the font set by the `/Fn size Tf` before them."""
    objects = {int(n): body for n, body in re.findall(rb"(\d+) 0 obj(.*?)endobj", pdf, re.S)}

    def stream(body: bytes) -> bytes | None:
        found = re.search(rb"stream\r?\n(.*?)\r?\nendstream", body, re.S)
        try:
            return zlib.decompress(found.group(1)) if found else None
        except zlib.error:
            return None  # an image

    def to_unicode(font: int) -> dict[str, str]:
        found = re.search(rb"/ToUnicode (\d+) 0 R", objects.get(font, b""))
        cmap = stream(objects[int(found.group(1))]) if found else None
        glyphs: dict[str, str] = {}
        for block in re.findall(rb"beginbfchar(.*?)endbfchar", cmap or b"", re.S):
            for code, text in re.findall(rb"<([0-9A-Fa-f]+)>\s*<([0-9A-Fa-f]+)>", block):
                glyphs[code.decode().upper()] = bytes.fromhex(text.decode()).decode("utf-16-be")
        for block in re.findall(rb"beginbfrange(.*?)endbfrange", cmap or b"", re.S):
            for low, high, first in re.findall(rb"<(\w+)>\s*<(\w+)>\s*<(\w+)>", block):
                for offset in range(int(high, 16) - int(low, 16) + 1):
                    glyphs[f"{int(low, 16) + offset:0{len(low)}X}"] = chr(int(first, 16) + offset)
        return glyphs

    fonts = {name.decode(): to_unicode(int(n)) for name, n in re.findall(rb"/(F\d+) (\d+) 0 R", pdf)}
    words = []
    for body in objects.values():
        content = stream(body) or b""
        font: dict[str, str] = {}
        for name, code in re.findall(rb"/(F\d+) [\d.]+ Tf|<([0-9A-Fa-f]+)> Tj", content):
            if name:
                font = fonts.get(name.decode(), {})
            else:
                code = code.decode().upper()
                words.append("".join(font.get(code[i : i + 4], "?") for i in range(0, len(code), 4)))
    return " ".join(words)


@pytest.mark.model
def test_the_report_in_chromium_at_a_phone_and_a_desktop_width_and_printed(resumed, tmp_path):
    if shutil.which("chromium") is None:
        pytest.skip("needs Debian's chromium to render report.html (apt-get install -y chromium)")
    page = (resumed / "report.html").as_uri()
    to_docs = os.environ.get("IMAGEMILL_DOCS_SCREENSHOTS") == "1"
    with Browser(tmp_path / "profile") as browser:
        for width in WIDTHS:
            browser.open(page, width)
            _check_layout(_layout(browser), width)
            shot = (ROOT / "docs" if to_docs else tmp_path) / f"report-{width}.png"
            browser.screenshot(shot)
            pixels = np.asarray(Image.open(shot).convert("RGB"))
            assert pixels.shape[1] == width and pixels.shape[0] > 900
            assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # drawn: text, chart, thumbnails
        pdf = browser.pdf()
    assert pdf.startswith(b"%PDF-")
    pages = len(re.findall(rb"/Type\s*/Page\b(?!s)", pdf))
    assert 1 <= pages <= 4, pages
    text = "".join(_pdf_text(pdf).split())  # the printer splits words where it kerns
    for expected in ("shapes, resumed", "2 runs", "interrupted", "complete", "start-up", "a red circle"):
        assert "".join(expected.split()) in text, (expected, text[:2000])


# --- any sequence of runs, from the records alone -----------------------------------------------------

RUN = st.tuples(
    st.sampled_from(["interrupted", "running", "stopped: budget reached"]),  # how it ended; running: killed
    st.floats(0, 120),  # its start-up, seconds
    st.lists(st.tuples(st.floats(1, 600), st.integers(0, 16)), max_size=4),  # shards: after ready, ok
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(earlier=st.lists(RUN, max_size=3), last=RUN)
def test_every_run_is_carried_on_and_counted_once(tmp_path_factory, earlier, last):
    """Runs one after another on one output, each record carrying the one before it on as the runner
    does: the report lists every run once, a killed run (its record still `running`) as killed at its
    last commit, and its totals are over all runs."""
    output = OutputLayout(str(tmp_path_factory.mktemp("runs")))
    clock = datetime(2026, 1, 1, tzinfo=UTC)
    record, shards, expected = None, [], []
    for n, (status, startup, made) in enumerate([*earlier, last]):
        ready = clock + timedelta(seconds=startup)
        own = [
            ShardStats(
                shard_id=f"r{n}-s{i}", run_id=f"run-{n}", input_file="in", rows=ok, ok=ok, error=0,
                finished_at=(ready + timedelta(seconds=after)).isoformat(),
            )
            for i, (after, ok) in enumerate(made)
        ]  # fmt: skip
        generating = max((after for after, _ in made), default=0.0)
        status = "complete" if n == len(earlier) else status
        ended = ready + timedelta(seconds=generating + 5)
        following = JobRecord(
            name="runs", spec={}, fingerprint={}, versions={}, started_at=clock.isoformat(),
            ready_at=ready.isoformat(), status="running", shards_total=1, rows_total=1, input_rows=1,
            input_files=1, input_footers={"in": "footer"}, run_id=f"run-{n}",
            runs=record.carried_runs(shards) if record else [],
        )  # fmt: skip
        shards += own
        killed = status == "running"
        if not killed:
            following.status, following.ended_at = status, ended.isoformat()
        record = following
        stop = ready + timedelta(seconds=generating) if killed and made else (ready if killed else ended)
        expected.append((KILLED if killed else status, stop, sum(ok for _, ok in made), generating, startup))
        clock = ended + timedelta(seconds=3600)  # the next run starts an hour later
    owned = OwnedOutput.unleased(output)  # the fixture's writes belong to no run
    write_job_record(owned, record)
    for stats in shards:
        commit_shard(owned.attempt(stats.shard_id), stats)
    report = write_report(owned)

    runs = report["runs"]
    assert [(run["status"], run["images"]) for run in runs] == [
        (s, images) for s, _, images, _, _ in expected
    ]
    assert [datetime.fromisoformat(run["ended_at"]) for run in runs] == [
        stop for _, stop, _, _, _ in expected
    ]
    assert sum(run["images"] for run in runs) == report["counts"]["rows_ok"]
    series = report["throughput"]
    if series["points"]:
        total_generating = sum(generating for *_, generating, _ in expected)
        assert series["generation_seconds"] == pytest.approx(total_generating, abs=0.01)
        assert series["startup_seconds"] == pytest.approx(sum(s for *_, s in expected), abs=0.01)
        wall = sum(run["seconds"] for run in runs)  # each run's own time: not the hours between runs
        assert series["wall_clock_seconds"] == pytest.approx(wall, abs=0.01)
        assert wall < 3600 * len(runs)
