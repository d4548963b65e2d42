"""One live run per output: the lease refuses a second driver, survives on its heartbeat, is taken
over once its owner is dead, and a model that does not load leaves the output free for the fix."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import fsspec
import pytest
from conftest import check_output, make_bucket, run_cli, write_prompt_files
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import imagemill
from imagemill.core.errors import ImagemillError
from imagemill.core.layout import OutputLayout
from imagemill.core.lease import LEASE_FILE, TIMEOUT_ENV, OutputLease, _boot_id
from imagemill.core.write_gate import LeaseLost, OwnedOutput
from imagemill.testing.in_process import run_in_process

DAY = 86_400  # the longest stale_after a lease file is believed (core/lease.py)
TIMEOUT = 2.0  # seconds without a heartbeat before a lease is stale, for every driver these tests start

JOB = """\
name: lease-test
input: {{path: {input}, rows_per_shard: 4}}
output: {{path: {output}}}
model: {{source: {model}}}
generation: {{width: 32, height: 32, num_inference_steps: 2, guidance_scale: 3.0}}
workers: {{num_workers: 1, batch_size: 4}}
"""


@pytest.fixture(params=["local", "s3"])
def output_url(request, tmp_path) -> str:
    """An output location on local disk, then on the moto S3 endpoint (a bucket per test)."""
    if request.param == "local":
        return str(tmp_path / "out")
    request.getfixturevalue("s3_endpoint")
    return f"{make_bucket(f'lease-{abs(hash(request.node.name)) % 10**8}')}/out"


@pytest.fixture
def short_timeout(monkeypatch) -> None:
    monkeypatch.setenv(TIMEOUT_ENV, str(TIMEOUT))


def _lease_record(url: str) -> dict | None:
    fs, root = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    path = f"{root}/{LEASE_FILE}"
    return json.loads(fs.cat_file(path)) if fs.exists(path) else None


def _owner_pattern(run_id: str, pid: int) -> str:
    host = re.escape(socket.gethostname())
    return rf"run {run_id} on host {host}, pid {pid}, heartbeat \d+ s ago"


def test_a_held_output_refuses_another_run_while_the_heartbeat_lives(output_url, short_timeout):
    output = OutputLayout(output_url)
    with OutputLease.held(output, "first") as first:
        time.sleep(TIMEOUT * 1.5)  # longer than the timeout: only the heartbeat keeps it fresh
        refused = pytest.raises(ImagemillError, match=_owner_pattern(first.run_id, os.getpid()))
        with refused, OutputLease.held(output, "second"):
            pass
        OwnedOutput(output, first.run_id).check()
        with pytest.raises(LeaseLost, match=f"run other lost .* to run {first.run_id} on host"):
            OwnedOutput(output, "other").check()
    assert _lease_record(output_url) is None  # released
    with OutputLease.held(output, "second") as second:
        OwnedOutput(output, second.run_id).check()


def test_racing_drivers_get_one_lease(output_url, short_timeout):
    """Eight takers at once, on the store's own atomic write: exactly one holds the output."""
    output = OutputLayout(output_url)
    start, done = threading.Barrier(8), threading.Event()
    winners, refused = [], []

    def take() -> None:
        start.wait()
        try:
            with OutputLease.held(OutputLayout(output_url), "racer") as lease:
                winners.append(lease.run_id)
                done.wait(30)
        except ImagemillError as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=take) for _ in range(8)]
    for thread in threads:
        thread.start()
    deadline = time.time() + 30
    while len(winners) + len(refused) < 8 and time.time() < deadline:
        time.sleep(0.05)
    done.set()
    for thread in threads:
        thread.join()
    assert len(winners) == 1 and len(refused) == 7, (winners, refused)
    assert all(f"run {winners[0]} on host" in message for message in refused)
    assert _lease_record(output_url) is None
    with OutputLease.held(output, "after"):
        pass


def test_a_run_whose_lease_was_taken_over_notices_and_leaves_the_new_lease(output_url, short_timeout):
    output = OutputLayout(output_url)
    fs, root = fsspec.core.url_to_fs(output_url)
    lost = pytest.raises(ImagemillError, match="this run lost .* to run newer on host elsewhere")
    with lost, OutputLease.held(output, "stalled") as stalled:
        # Another driver found this run stale (it stalled past the timeout) and took the output.
        newer = {"run_id": "newer", "host": "elsewhere", "pid": 1, "heartbeat": time.time() + 60}
        fs.pipe_file(f"{root}/{LEASE_FILE}", json.dumps(newer).encode())
        time.sleep(TIMEOUT)  # the next heartbeat finds the lease changed
        assert stalled.lost_to is not None
        stalled.confirm()
    assert _lease_record(output_url)["run_id"] == "newer"  # the lost run did not delete it


def test_a_lease_left_by_a_driver_on_another_machine_is_taken_over_once_stale(
    output_url, short_timeout, caplog
):
    output = OutputLayout(output_url)
    fs, root = fsspec.core.url_to_fs(output_url)
    fs.makedirs(root, exist_ok=True)
    # What a driver killed on another machine leaves behind: its lease, its heartbeat stopped now.
    gone = {"run_id": "gone", "host": "elsewhere", "pid": 1, "heartbeat": time.time(), "stale_after": TIMEOUT}
    fs.pipe_file(f"{root}/{LEASE_FILE}", json.dumps(gone).encode())
    refused = pytest.raises(ImagemillError, match=r"run gone on host elsewhere, pid 1, heartbeat \d s ago")
    with refused, OutputLease.held(output, "early"):
        pass
    time.sleep(TIMEOUT + 0.5)
    with OutputLease.held(output, "later") as later:
        OwnedOutput(output, later.run_id).check()
    assert (
        "took over" in caplog.text
        and "run gone on host elsewhere, pid 1 (its heartbeat stopped" in caplog.text
    )


def _job(tmp_path: Path, prompts: str, output: str, model: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(JOB.format(input=prompts, output=output, model=model))
    return path


def _commits(url: str) -> int:
    fs, root = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    return len(fs.glob(f"{root}/shards/*.json"))


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory, tiny_model) -> tuple[str, set[str], dict[str, str]]:
    """The prompts, their ids and the images of an unbroken run, which the runs below must match (one
    for the module: the local and the S3 case compare with the same images). It runs in process
    (testing.in_process: the bytes a Ray run writes); the runs it is compared with are on Ray."""
    folder = tmp_path_factory.mktemp("unbroken")
    prompts = str(folder / "prompts")
    rows = write_prompt_files(prompts, n_files=2, rows_per_file=32, row_group_size=4)
    ids = {f"row-{i:05d}" for i in range(rows)}
    job = _job(folder, prompts, str(folder / "out"), tiny_model)
    assert run_in_process(imagemill.load_spec(job)).complete
    return prompts, ids, check_output(str(folder / "out"), ids, 32, 32)


def test_two_drivers_on_one_output_one_is_refused_and_a_dead_owner_is_taken_over(
    ray_address, tmp_path, tiny_model, output_url, monkeypatch, unbroken, caplog
):
    # The owner is paused (SIGSTOP) while the others knock: its lease must stay fresh meanwhile, so the
    # timeout is long here; a dead owner on this machine is taken over at once whatever the timeout.
    monkeypatch.setenv(TIMEOUT_ENV, "300")  # run_cli and Popen pass the environment on
    prompts, ids, expected = unbroken
    rows = len(ids)

    job = _job(tmp_path, prompts, output_url, tiny_model)
    owner = subprocess.Popen(
        [sys.executable, "-m", "imagemill.cli", "run", str(job), "--no-progress"],
        env={**os.environ, "RAY_ADDRESS": ray_address},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 180
        while _commits(output_url) < 2:
            assert owner.poll() is None and time.time() < deadline, "the first driver ended or stalled"
            time.sleep(0.1)
        lease = _lease_record(output_url)
        assert (lease["pid"], lease["host"]) == (owner.pid, socket.gethostname())
        # Paused, the owner hands out no more shards, however slowly the others start on a busy
        # machine; it is alive, and its lease is fresh.
        owner.send_signal(signal.SIGSTOP)

        # A second driver, even with --overwrite, is refused in one line naming the owner, and
        # deletes nothing.
        for extra in ([], ["--overwrite"]):
            committed = _commits(output_url)
            refused = run_cli("run", str(job), "--no-progress", *extra, ray_address=ray_address)
            assert owner.poll() is None, "the first driver ended before the second was refused"
            assert refused.returncode == 2, refused.stderr
            [verdict] = [line for line in refused.stderr.splitlines() if line.startswith("imagemill: ")]
            assert re.search(_owner_pattern(lease["run_id"], owner.pid), verdict), verdict
            assert _commits(output_url) >= committed
        status = run_cli("status", output_url)
        assert re.search(r": running \(heartbeat \d+ s ago\)", status.stdout), status.stdout
    finally:
        owner.send_signal(signal.SIGKILL)  # no cleanup of any kind: the lease stays, its heartbeat stops
        owner.wait()
    assert _commits(output_url) < rows // 4, "every shard was done before the kill: lengthen the job"
    assert _lease_record(output_url)["run_id"] == lease["run_id"]

    # On the owner's machine a dead driver is seen at once; elsewhere it takes TIMEOUT (test below).
    # The run that takes over is the real driver with its shards in process (testing.in_process).
    status = run_cli("status", output_url)
    assert re.search(r": stopped \(last seen \d+ s ago\)", status.stdout), status.stdout
    caplog.set_level(logging.WARNING, logger="imagemill.core.lease")
    assert run_in_process(imagemill.load_spec(job)).complete
    assert f"took over {output_url} from run {lease['run_id']}" in caplog.text, caplog.text
    assert "its process is gone" in caplog.text
    assert check_output(output_url, ids, 32, 32) == expected
    assert _lease_record(output_url) is None


def test_a_model_that_does_not_load_says_so_in_one_line_and_leaves_the_output_free(
    ray_address, tmp_path, tiny_model
):
    import shutil

    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model, broken)
    [weights] = broken.glob("unet/*.safetensors")
    weights.write_bytes(b"not safetensors" * 10)
    prompts = str(tmp_path / "prompts")
    rows = write_prompt_files(prompts, n_files=1, rows_per_file=8, row_group_size=4)
    job = _job(tmp_path, prompts, str(tmp_path / "out"), str(broken))

    failed = run_cli("run", str(job), "--no-progress", ray_address=ray_address)
    assert failed.returncode == 2
    lines = failed.stderr.splitlines()
    [verdict] = [line for line in lines if line.startswith("imagemill: error: ")]
    assert verdict.startswith(f"imagemill: error: workers could not load model {broken}: OSError: "), verdict
    for noise in ("Traceback", "SIGABRT", "(ShardWorker", "Fatal Python error"):
        assert noise not in failed.stderr, failed.stderr
    # Besides the verdict, only Ray's own start-up notice and the loading lines may appear.
    assert all(
        line == verdict
        or "worker.py" in line
        or "loading the model on 1 worker…" in line
        or "placement: 1 actor on CPU" in line
        for line in lines
    ), failed.stderr
    log_file = re.search(r"full traceback: (\S+\.log)\)", verdict).group(1)
    assert "Unable to load weights" in Path(log_file).read_text()
    assert _lease_record(str(tmp_path / "out")) is None

    # The corrected spec (another model) runs into the same output without --overwrite (the real
    # driver, its shards in process).
    fixed = _job(tmp_path, prompts, str(tmp_path / "out"), tiny_model, name="fixed.yaml")
    assert run_in_process(imagemill.load_spec(fixed)).complete
    check_output(str(tmp_path / "out"), {f"row-{i:05d}" for i in range(rows)}, 32, 32)


_any_value = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.lists(st.integers(), max_size=2),
)
_near_now = st.floats(min_value=-200, max_value=200).map(lambda delta: time.time() + delta)
_lease_fields = st.fixed_dictionaries(
    {},
    optional={
        "run_id": _any_value,
        "host": st.sampled_from([socket.gethostname(), "elsewhere"]) | _any_value,
        "boot_id": st.sampled_from([_boot_id(), "other-boot"]) | _any_value,
        "pid": st.sampled_from([os.getpid(), 1, 2**31 - 1, 2**80, -1, 0]) | _any_value,
        "heartbeat": _near_now | _any_value,
        "stale_after": st.sampled_from([1.0, 60.0, 1e308, 0.0, -5.0]) | _any_value,
    },
)
_lease_files = st.one_of(
    _lease_fields.map(lambda record: json.dumps(record).encode()),  # NaN and Infinity as Python writes them
    st.tuples(_lease_fields, st.integers(0, 200)).map(
        lambda t: json.dumps(t[0]).encode()[: t[1]]
    ),  # cut short
    st.binary(max_size=60),
    st.just(b"[" * 100_000),  # deeper than the JSON parser recurses
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=_lease_files)
def test_a_hostile_lease_file_is_taken_over_or_refused_in_one_line_never_held_for_ever(
    tmp_path_factory, monkeypatch, content
):
    """Whatever `_lease.json` holds, a new run takes the output over or is refused in one line, and a
    refusal comes only from a lease that is believable and will go stale: a finite heartbeat no more
    than its `stale_after` (finite, at most a day) in the future."""
    monkeypatch.setenv(TIMEOUT_ENV, str(TIMEOUT))
    out = tmp_path_factory.mktemp("out")
    (out / LEASE_FILE).write_bytes(content)
    try:
        with OutputLease.held(OutputLayout(str(out)), "next") as lease:
            assert _lease_record(str(out))["run_id"] == lease.run_id  # it holds the output now
    except ImagemillError as exc:
        assert "\n" not in str(exc) and "is in use by another imagemill run" in str(exc), str(exc)
        record = json.loads(content)
        heartbeat, stale_after = record["heartbeat"], record["stale_after"]
        for value in (heartbeat, stale_after):
            assert type(value) in (int, float) and math.isfinite(value), record
        assert 0 < stale_after <= DAY and heartbeat <= time.time() + stale_after, record


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"heartbeat": time.time() + 3600, "stale_after": 60}, "in the future"),
        ({"heartbeat": math.nan, "stale_after": 60}, "is not a number"),
        ({"heartbeat": "soon", "stale_after": 60}, "is not a number"),
        ({"heartbeat": time.time(), "stale_after": math.inf}, "stale_after"),
        ({"heartbeat": time.time()}, "stale_after"),
    ],
)
def test_a_lease_that_cannot_be_believed_is_taken_over_at_once_saying_why(tmp_path, caplog, fields, problem):
    out = tmp_path / "out"
    out.mkdir()
    (out / LEASE_FILE).write_text(json.dumps({"run_id": "odd", "host": "elsewhere", "pid": 1, **fields}))
    with OutputLease.held(OutputLayout(str(out)), "next"):
        pass
    assert "took over" in caplog.text and problem in caplog.text, caplog.text


def test_a_lease_path_that_is_a_folder_or_a_fifo_is_one_line(tmp_path):
    for make in (os.mkdir, os.mkfifo):
        out = tmp_path / make.__name__
        out.mkdir()
        make(out / LEASE_FILE)
        with pytest.raises(
            ImagemillError, match=f"{LEASE_FILE} is .*, not imagemill's lease file; remove it"
        ):
            OutputLease.held(OutputLayout(str(out)), "next").__enter__()
