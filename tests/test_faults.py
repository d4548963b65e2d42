"""Exactly-once and resume under faults: a lost node, a killed actor, a flaky and a broken S3.

Each test ends with the exactly-once check (`check_output`): every input id has exactly one metadata
row, all ok, every image exists and matches its row, no image exists that no row names, _SUCCESS.
Each also checks that its fault really happened, so none passes by running fault-free.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import fsspec
import psutil
import yaml
from conftest import (
    OBJECT_STORE_BYTES,
    check_output,
    isolated_cluster,
    make_bucket,
    run_cli,
    write_prompt_files,
)

import imagemill
from imagemill.testing.in_process import run_in_process
from imagemill.testing.s3_fault_proxy import S3FaultProxy

SMALL = {"width": 32, "height": 32, "num_inference_steps": 2, "guidance_scale": 5.0}


def _ids(rows: int) -> set[str]:
    return {f"row-{i:05d}" for i in range(rows)}


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _wait_for(condition, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _committed(output: str) -> list[str]:
    """Shard ids committed in a local output folder."""
    return sorted(path.stem for path in Path(output, "shards").glob("*.json"))


def _write_job(path: Path, spec: dict) -> str:
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_a_lost_node_loses_and_duplicates_nothing(tmp_path, tiny_model, monkeypatch):
    """3 one-CPU worker nodes (the head takes no actors), one actor each; a node is removed after the
    first commit. Its shards go back to the queue, the other actors finish the job: driver exit 0."""
    # Work starts with the first ready actor, and the node goes once all three are ready: the job must
    # outlast the slowest actor's load with shards to spare (48 shards).
    rows = write_prompt_files(str(tmp_path / "prompts"), n_files=3, rows_per_file=64, row_group_size=4)
    shards = rows // 4
    output = str(tmp_path / "out")
    job = _write_job(
        tmp_path / "job.yaml",
        {
            "name": "node-loss",
            "input": {"path": str(tmp_path / "prompts"), "rows_per_shard": 4},
            "output": {"path": output},
            "model": {"source": tiny_model},
            "generation": SMALL,
            "workers": {"batch_size": 4},
        },
    )
    deadline = time.monotonic() + 170  # the whole test, cluster start and shutdown aside
    driver = None
    log_path = tmp_path / "driver.log"
    with isolated_cluster(monkeypatch) as cluster:
        nodes = [cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE_BYTES) for _ in range(3)]
        cluster.wait_for_nodes()
        with open(log_path, "w") as log:
            driver = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "imagemill.cli",
                    "run",
                    job,
                    "--num-workers",
                    "3",
                    "--no-progress",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "RAY_ADDRESS": cluster.address},
            )
        started = time.monotonic()
        _wait_for(  # work starts with the first ready actor: wait for all three, and a commit
            lambda: ("(3 of 3)" in log_path.read_text() and _committed(output)) or driver.poll() is not None,
            deadline - time.monotonic(),
            "three ready workers and a first committed shard",
        )
        assert driver.poll() is None, log_path.read_text()
        done_before = len(_committed(output))
        print(f"removing a node after {time.monotonic() - started:.1f} s: {done_before}/{shards} shards done")
        cluster.remove_node(nodes[1])
        try:
            assert driver.wait(timeout=max(1.0, deadline - time.monotonic())) == 0, log_path.read_text()
        finally:
            if driver.poll() is None:
                driver.kill()
    text = log_path.read_text()
    assert done_before < shards, "the job ended before the node was removed"
    assert "worker died" in text, text
    check_output(output, _ids(rows), 32, 32)


def test_an_actor_lost_before_it_loaded_is_replaced_not_taken_for_a_broken_model(
    ray_session, tmp_path, monkeypatch
):
    """The job's first actor dies before any has loaded (killed here; in the chaos soak its node was
    removed): that says nothing about the model, so a replacement is started and the job finishes.
    (It used to stop the job: "workers could not load model: ActorDiedError ...".)"""
    from imagemill.execution.scheduler import ShardScheduler

    rows = write_prompt_files(str(tmp_path / "prompts"), n_files=1, rows_per_file=8, row_group_size=4)
    output = str(tmp_path / "out")
    spec = imagemill.build_spec(
        {
            "name": "lost-before-load",
            "input": {"path": str(tmp_path / "prompts"), "rows_per_shard": 4},
            "output": {"path": output},
            "model": {"kind": "noop"},
            "generation": SMALL,
            "workers": {"num_workers": 1, "batch_size": 4},
        }
    )
    new_replica = ShardScheduler._new_replica
    killed = []

    def first_one_killed(self):
        replica = new_replica(self)
        if not killed:
            ray_session.kill(
                replica.leader
            )  # before its ready() can answer: a system death, not a load error
            killed.append(replica.leader)
        return replica

    monkeypatch.setattr(ShardScheduler, "_new_replica", first_one_killed)
    result = imagemill.run(spec, progress=False)
    assert killed and result.complete and not result.failures, result.summary()
    check_output(output, _ids(rows), 32, 32)


def _shard_worker_pids() -> set[int]:
    """ShardWorker actor processes under this process (the session Ray's raylet is our child).

    Ray titles an actor's process `ray::ShardWorker` when idle, `ray::ShardWorker.process_shard` busy.
    """
    pids = set()
    for process in psutil.Process().children(recursive=True):
        try:
            title = (process.cmdline() or [process.name()])[0]
            if title.startswith("ray::ShardWorker") and process.status() != psutil.STATUS_ZOMBIE:
                pids.add(process.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return pids


def test_a_killed_actor_loses_and_duplicates_nothing(ray_session, tmp_path, tiny_model, caplog):
    """SIGKILL one of two actors after the first commit: its shards are re-queued on a replacement."""
    # 24 shards: work starts with the first ready actor, and the kill waits for both.
    rows = write_prompt_files(str(tmp_path / "prompts"), n_files=3, rows_per_file=32, row_group_size=4)
    output = str(tmp_path / "out")
    spec = imagemill.build_spec(
        {
            "name": "actor-kill",
            "input": {"path": str(tmp_path / "prompts"), "rows_per_shard": 4},
            "output": {"path": output},
            "model": {"source": tiny_model},
            "generation": SMALL,
            "workers": {"num_workers": 2, "batch_size": 4},
        }
    )
    earlier = _shard_worker_pids()  # actors of earlier tests that may still be exiting
    outcome: dict = {}

    def job() -> None:
        try:
            outcome["result"] = imagemill.run(spec, progress=False)
        except BaseException as exc:
            outcome["error"] = exc

    caplog.set_level(logging.INFO, logger="imagemill.execution.scheduler")
    thread = threading.Thread(target=job, name="imagemill-job", daemon=True)
    thread.start()
    _wait_for(  # work starts with the first ready actor: wait for both, and a commit
        lambda: ("(2 of 2)" in caplog.text and _committed(output)) or not thread.is_alive(),
        120,
        "two ready workers and a first committed shard",
    )
    assert thread.is_alive(), outcome
    actors = _wait_for(lambda: sorted(_shard_worker_pids() - earlier), 10, "the job's actor processes")
    assert len(actors) == 2, actors
    done_before = len(_committed(output))
    os.kill(actors[0], signal.SIGKILL)
    thread.join(timeout=150)
    assert not thread.is_alive(), "the job did not finish"
    assert "error" not in outcome, outcome
    result = outcome["result"]
    assert done_before < rows // 4, "the job ended before the actor was killed"
    assert "worker died" in caplog.text, caplog.text
    assert result.complete and not result.failures, result.summary()
    assert (result.rows_total, result.ok, result.errors) == (rows, rows, 0)
    check_output(output, _ids(rows), 32, 32)
    # The killed attempts reported nothing: the driver charged their actor's wall-clock (device_ledger.py).
    assert result.cost.failed_attempts >= 1 and result.cost.failed_device_seconds > 0, result.cost
    attempts = [json.loads(path.read_text()) for path in Path(output, "attempts").glob("*.json")]
    assert any(not failed["reported"] for record in attempts for failed in record["failed"]), attempts


def _s3_spec(name: str, bucket: str, storage_options: dict) -> dict:
    """A job whose faults are the storage's: the model's `noop` kind (no model to load, seconds saved
    per actor), one actor to meet them."""
    return {
        "name": name,
        "input": {"path": f"{bucket}/prompts", "rows_per_shard": 4, "storage_options": storage_options},
        "output": {"path": f"{bucket}/out", "storage_options": storage_options},
        "model": {"kind": "noop"},
        "generation": SMALL,
        "workers": {"num_workers": 1, "batch_size": 4},
    }


def test_transient_s3_errors_lose_and_duplicate_nothing(ray_session, s3_endpoint):
    """Input and output through a proxy that answers every 4th request with 503 SlowDown."""
    bucket = make_bucket(_unique("faults-flaky"))
    rows = write_prompt_files(f"{bucket}/prompts", n_files=2, rows_per_file=8, row_group_size=4)
    with S3FaultProxy(s3_endpoint, fail_every=4) as proxy:
        # One try per client call: the 503s are met by imagemill's own retries, not botocore's (whose
        # backoff of up to seconds per retry made this test slow, and would hide a call left unretried).
        options = {"endpoint_url": proxy.url, "config_kwargs": {"retries": {"max_attempts": 1}}}
        spec = imagemill.build_spec(_s3_spec("flaky-s3", bucket, options))
        result = imagemill.run(spec, progress=False)
    assert proxy.failures > 0 and proxy.slowdowns == proxy.failures
    assert {"GET", "PUT"} <= set(proxy.failed_by_method), proxy.failed_by_method
    assert result.complete and not result.failures, result.summary()
    assert (result.rows_total, result.ok, result.errors) == (rows, rows, 0)
    check_output(f"{bucket}/out", _ids(rows), 32, 32)  # read through the real endpoint


def test_dropped_connections_and_lost_answers_on_s3_lose_and_duplicate_nothing(s3_endpoint):
    """Every 7th connection closed unanswered before the request reaches S3, every 5th after it has
    (the write landed, its answer is lost: the retry meets its own object, the lease swap its own
    lease); the driver's run, its shards in this process."""
    bucket = make_bucket(_unique("faults-dropped"))
    rows = write_prompt_files(f"{bucket}/prompts", n_files=2, rows_per_file=8, row_group_size=4)
    with S3FaultProxy(s3_endpoint, drop_every=7, lose_answer_every=5) as proxy:
        options = {"endpoint_url": proxy.url, "config_kwargs": {"retries": {"max_attempts": 1}}}
        result = run_in_process(imagemill.build_spec(_s3_spec("dropped-s3", bucket, options)))
    assert proxy.drops > 0 and proxy.lost_answers > 0
    assert result.complete and not result.failures, result.summary()
    assert (result.rows_total, result.ok, result.errors) == (rows, rows, 0)
    check_output(f"{bucket}/out", _ids(rows), 32, 32)


def test_a_broken_input_file_fails_its_shards_and_a_rerun_finishes(ray_address, s3_endpoint, tmp_path):
    """An input file that always answers 500: exit 1 naming it, the other file's shards are committed;
    once the file reads again, a re-run finishes the job: nothing lost or doubled."""
    name = _unique("faults-broken-input")
    bucket = make_bucket(name)
    rows = write_prompt_files(f"{bucket}/prompts", n_files=2, rows_per_file=8, row_group_size=4)
    fs = fsspec.filesystem("s3")
    with S3FaultProxy(s3_endpoint, broken_paths={f"{name}/prompts/part-001.parquet"}) as proxy:
        job = _write_job(tmp_path / "job.yaml", _s3_spec("broken-input", bucket, {"endpoint_url": proxy.url}))
        args = ["run", job, "--set", "workers.max_shard_attempts=2", "--no-progress"]
        failed = run_cli(*args, ray_address=ray_address, timeout=150)
        assert failed.returncode == 1, failed.stdout + failed.stderr
        assert "FAILED shard part-001" in failed.stdout, failed.stdout + failed.stderr
        assert "part-001.parquet" in failed.stdout
        assert proxy.internal_errors > 0
        fs.invalidate_cache()
        committed = sorted(Path(p).stem for p in fs.ls(f"{name}/out/shards"))
        assert committed == ["part-000-rg00000-00001", "part-000-rg00001-00002"]
        assert not fs.exists(f"{name}/out/_SUCCESS")

        proxy.broken_paths.clear()  # the re-run: the real driver, its shards in process
        again = run_in_process(imagemill.load_spec(job))
        assert again.complete and not again.failures, again.summary()
    check_output(f"{bucket}/out", _ids(rows), 32, 32)


def test_a_shard_whose_commit_keeps_failing_is_retried_then_resumed(ray_address, s3_endpoint, tmp_path):
    """The commit (stats file) of one shard always answers 500, after its images and metadata were
    written: the shard is tried max_shard_attempts times and reported; the rerun redoes it, and its
    second set of files replaces the first: still exactly one row and one image per id."""
    name = _unique("faults-broken-commit")
    bucket = make_bucket(name)
    rows = write_prompt_files(f"{bucket}/prompts", n_files=2, rows_per_file=8, row_group_size=4)
    stuck = "part-000-rg00001-00002"
    fs = fsspec.filesystem("s3")
    with S3FaultProxy(s3_endpoint, broken_paths={f"{name}/out/shards/{stuck}.json"}) as proxy:
        # One try per client call, so the 500s are met by imagemill's own retries (0.5+1+2+4 s).
        options = {"endpoint_url": proxy.url, "config_kwargs": {"retries": {"max_attempts": 1}}}
        job = _write_job(tmp_path / "job.yaml", _s3_spec("broken-commit", bucket, options))
        args = ["run", job, "--set", "workers.max_shard_attempts=2", "--no-progress"]
        failed = run_cli(*args, ray_address=ray_address, timeout=150)
        assert failed.returncode == 1, failed.stdout + failed.stderr
        assert f"FAILED shard {stuck}" in failed.stdout, failed.stdout + failed.stderr
        assert "after 2 tries" in failed.stdout, failed.stdout
        assert proxy.internal_errors >= 2 * 5  # 2 shard attempts of 5 writes each
        fs.invalidate_cache()
        assert fs.exists(f"{name}/out/metadata/{stuck}.parquet"), "the failed attempts wrote no files"
        assert len(fs.ls(f"{name}/out/shards")) == 3
        assert not fs.exists(f"{name}/out/_SUCCESS")

        proxy.broken_paths.clear()  # the re-run: the real driver, its shards in process
        again = run_in_process(imagemill.load_spec(job))
        assert again.complete and not again.failures, again.summary()
    check_output(f"{bucket}/out", _ids(rows), 32, 32)
    stats = json.loads(fs.cat_file(f"{name}/out/shards/{stuck}.json"))
    assert stats["ok"] == 4
