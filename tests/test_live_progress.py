"""Progress between commits: images counted from batches on the console, in the lease's heartbeat and in
`imagemill status`, and a line while the model loads, instead of silence until a shard commits."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_bucket, run_cli
from hypothesis import given
from hypothesis import strategies as st

import imagemill
from imagemill.cli.commands import main
from imagemill.core.errors import ImagemillError
from imagemill.core.job_record import read_job_record, write_job_record
from imagemill.core.layout import OutputLayout
from imagemill.core.lease import LEASE_FILE, TIMEOUT_ENV, OutputLease, read_lease
from imagemill.core.records import RunProgress, run_progress
from imagemill.core.write_gate import OwnedOutput
from imagemill.execution.progress import PROGRESS_ENV
from imagemill.reporting.status import STATUS_EXIT_CODES, job_status
from imagemill.testing.in_process import run_in_process

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = ROOT / "jobs" / "models" / "demo-shapes"
DEMO_PROMPTS = ROOT / "jobs" / "demo_prompts.parquet"  # 64 rows in 4 row groups
PROGRESS_LINE = re.compile(r"progress: ([1-9]\d*)/64 images \(\d+%\), 0/1 shards")  # images, no commit


def _one_long_shard(tmp_path: Path) -> Path:
    """The demo's 64 prompts as one shard on one worker, two images a batch, many steps: a shard that
    runs for a minute or more, longer than the test waits for."""
    job = tmp_path / "job.yaml"
    job.write_text(
        f"name: live\ninput: {{path: {DEMO_PROMPTS}, rows_per_shard: 64}}\n"
        f"output: {{path: {tmp_path / 'out'}}}\nmodel: {{source: {DEMO_MODEL}}}\n"
        "generation: {width: 32, height: 32, num_inference_steps: 40, guidance_scale: 3.0}\n"
        "workers: {num_workers: 1, batch_size: 2}\n"
    )
    return job


@pytest.mark.cli
def test_a_long_shard_shows_images_on_the_console_and_in_status_before_it_commits(ray_address, tmp_path):
    job = _one_long_shard(tmp_path)
    log_path = tmp_path / "run.log"
    # A progress line at least every 0.5 s; a heartbeat every second (a third of the lease timeout).
    env = {**os.environ, "RAY_ADDRESS": ray_address, PROGRESS_ENV: "0.5", TIMEOUT_ENV: "3"}
    with open(log_path, "w") as log:  # stderr to a file, as `2> log` and `kubectl logs` have it
        driver = subprocess.Popen(
            [sys.executable, "-m", "imagemill.cli", "run", str(job), "--no-progress"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        live = None
        deadline = time.time() + 400
        while live is None:
            assert driver.poll() is None, f"the run ended first:\n{log_path.read_text()}"
            assert time.time() < deadline, f"no live progress in status:\n{log_path.read_text()}"
            status = run_cli("status", str(tmp_path / "out"))
            live = re.search(r"images: ([1-9]\d*)/64 done now, 0/1 shards committed", status.stdout)
        assert "shards: 0/1 done" in status.stdout, status.stdout
        assert re.search(r": running \(heartbeat \d+ s ago\)", status.stdout), status.stdout
        while len(PROGRESS_LINE.findall(log_path.read_text())) < 2:
            assert driver.poll() is None and time.time() < deadline, log_path.read_text()
            time.sleep(0.2)
    finally:
        driver.send_signal(signal.SIGTERM)
        driver.wait(timeout=120)
    text = log_path.read_text()
    assert " done: " not in text, "the shard committed before the test saw it run: lengthen it"
    assert b"\r" not in log_path.read_bytes(), "a progress bar drew into the log"
    counts = [int(images) for images in PROGRESS_LINE.findall(text)]
    assert len(counts) >= 2 and counts == sorted(counts), text
    loading = text.find("loading the model on 1 worker…")
    first = re.search(r"progress: \d+/64 images", text).start()
    assert 0 <= loading < first, f"no loading line before the first progress line:\n{text}"


@pytest.mark.parametrize("output_kind", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_the_heartbeat_carries_the_runs_progress_to_status(output_kind, tmp_path, monkeypatch, request):
    if output_kind == "local":
        url = str(tmp_path / "out")
    else:
        request.getfixturevalue("s3_endpoint")
        url = f"{make_bucket('live-progress')}/out"
    monkeypatch.setenv(TIMEOUT_ENV, "0.6")  # a heartbeat every 0.2 s
    output = OutputLayout(url)
    progress = RunProgress(
        images_done=12, images_total=64, shards_done=0, shards_total=1, workers_ready=1, workers_loading=0
    )
    with OutputLease.held(output, "live") as lease:
        assert read_lease(output).progress is None, "no progress before the driver has any"
        lease.progress = progress
        deadline = time.time() + 30
        while read_lease(output).progress != progress:
            assert time.time() < deadline, "the heartbeat never wrote the progress"
            time.sleep(0.05)


def test_status_says_a_run_is_loading_the_model_before_its_job_record_exists(tmp_path, monkeypatch, capsys):
    """The job record is written once a worker has loaded the model; before that, a live run's lease
    is what status reads: a normal state (running, exit 5), with the workers still loading."""
    monkeypatch.setenv(TIMEOUT_ENV, "0.6")  # a heartbeat every 0.2 s
    out = tmp_path / "out"
    output = OutputLayout(str(out))
    loading = RunProgress(
        images_done=0, images_total=64, shards_done=0, shards_total=4, workers_ready=0, workers_loading=2
    )
    with OutputLease.held(output, "night") as lease:
        lease.progress = loading
        deadline = time.time() + 30
        while read_lease(output).progress != loading:
            assert time.time() < deadline, "the heartbeat never wrote the progress"
            time.sleep(0.05)
        code = main(["status", str(out)])
        captured = capsys.readouterr()
    assert code == STATUS_EXIT_CODES["running"] and not captured.err, captured.err
    assert captured.out.startswith(f"job night at {out}: starting, loading the model on 2 workers (heartbeat")
    assert main(["status", str(out)]) == 2  # the run gone and no record: no job here
    assert "no imagemill job found" in capsys.readouterr().err


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=7),
    max_leaves=12,
)
FIELDS = list(RunProgress.model_fields)


@given(
    st.one_of(
        JSON,
        st.fixed_dictionaries({name: JSON for name in FIELDS}),
        st.fixed_dictionaries({name: st.integers() for name in FIELDS}),
    )
)
def test_a_hostile_progress_in_the_lease_is_no_progress_never_a_crash(value):
    """A lease written by hand, by another version or cut short: `status` must still answer."""
    found = run_progress({"progress": value})
    if found is not None:
        assert all(getattr(found, name) >= 0 for name in FIELDS)
        assert type(value) is dict and all(type(value[name]) is int for name in FIELDS)


def test_status_shows_the_live_progress_of_a_running_job_and_ignores_a_hostile_one(tmp_path):
    """`status` over an output whose record says running and whose lease is fresh: the lease's progress
    is a line of its own; a lease whose progress is nonsense leaves the committed counts only."""
    out = tmp_path / "out"
    spec = imagemill.load_spec(_one_long_shard(tmp_path), [("model.kind", "noop")])
    run_in_process(spec)
    output = OutputLayout(str(out))
    record = read_job_record(output)
    record.status = "running"
    write_job_record(OwnedOutput.unleased(output), record)
    lease = {"run_id": "x", "pid": os.getpid(), "heartbeat": time.time(), "stale_after": 600}
    progress = {"images_done": 12, "images_total": 64, "shards_done": 0, "shards_total": 1}
    for hostile in ({"images_done": float("nan")}, {**progress, "workers_ready": True}, [1], "12"):
        (out / LEASE_FILE).write_text(json.dumps({**lease, "progress": hostile}))
        text = job_status(str(out)).text()
        assert ": running (heartbeat" in text and "images:" not in text, text
    live = {**progress, "workers_ready": 1, "workers_loading": 1}
    (out / LEASE_FILE).write_text(json.dumps({**lease, "progress": live}))
    text = job_status(str(out)).text()
    assert "images: 12/64 done now, 0/1 shards committed; workers: 1 ready, loading the model on 1" in text


@pytest.mark.parametrize("value", ["abc", "0", "-1", "0.1", "nan", "inf", "1e999", " ", "30s"])
def test_a_bad_progress_interval_is_refused_in_one_line_before_anything_runs(value, tmp_path, monkeypatch):
    monkeypatch.setenv(PROGRESS_ENV, value)
    spec = imagemill.load_spec(_one_long_shard(tmp_path))
    with pytest.raises(ImagemillError, match=rf"^{PROGRESS_ENV}=.* is not a number of seconds from 0.5 up"):
        imagemill.run(spec, progress=False)
    assert not (tmp_path / "out").exists(), "refused before the output was touched"
