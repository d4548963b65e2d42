"""Jobs on a Ray cluster: submitted through the Jobs API, and a worker pool that follows the cluster."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import OBJECT_STORE_BYTES, check_output, isolated_cluster, run_cli, write_prompt_files

RAY = str(Path(sys.executable).parent / "ray")
SECRET = "sk-imagemill-submitted-secret"
CURRENT_CLUSTER = Path("/tmp/ray/ray_current_cluster")  # `ray start` records itself here
AGENT_PORTS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
               "runtime-env-agent-port", "ray-client-server-port")  # fmt: skip


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.2)


def _answers(url: str) -> bool:
    """Whether an HTTP server answers at all (Ray's token authentication answers 401 to us)."""
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


@pytest.fixture
def ray_head(tmp_path):
    """A separate single-node cluster started the way users start one: `ray start --head`."""
    dashboard = f"http://127.0.0.1:{(dashboard_port := _free_port())}"
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    recorded = CURRENT_CLUSTER.read_text() if CURRENT_CLUSTER.exists() else None
    # imagemill on the job's PATH; no token authentication between this test and its own cluster
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "RAY_AUTH_MODE": "disabled",
    }
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={_free_port()}", "--num-cpus=2",
         f"--dashboard-port={dashboard_port}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
         f"--object-store-memory={OBJECT_STORE_BYTES}", f"--temp-dir={temp_dir}",
         # Free ports for what defaults to fixed ones, which the session Ray on this machine holds.
         *(f"--{name}={_free_port()}" for name in AGENT_PORTS)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        _wait_for(lambda: _answers(f"{dashboard}/api/version"), 120, "the Ray dashboard")
        yield dashboard
    finally:
        os.killpg(head.pid, signal.SIGINT)  # `ray start --block` stops its cluster on Ctrl-C
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        if recorded is None:
            CURRENT_CLUSTER.unlink(missing_ok=True)  # plain ray.init() calls must not join a dead cluster
        else:
            CURRENT_CLUSTER.write_text(recorded)


def test_submit_runs_a_job_through_the_jobs_api(ray_head, tmp_path, tiny_model):
    rows = write_prompt_files(str(tmp_path / "prompts"), n_files=2, rows_per_file=8, row_group_size=4)
    job = tmp_path / "job.yaml"
    job.write_text(
        "name: submitted-{date}\n"
        f"input: {{path: {tmp_path / 'prompts'}, rows_per_shard: 4}}\n"
        f"output:\n  path: {tmp_path / 'out' / '{date}'}\n"
        f"model: {{source: {tiny_model}}}\n"
        "generation: {width: 32, height: 32, num_inference_steps: 1}\n"
        "workers: {num_workers: 2, batch_size: 4}\n"
    )
    secret = f"--set input.storage_options.secret_token={SECRET}"  # local fsspec takes any option
    done = run_cli(
        "submit", str(job), "--address", ray_head, "--date", "2026-11-24", "--set", "workers.batch_size=2",
        *secret.split(" "),
    )  # fmt: skip

    assert done.returncode == 0, done.stdout + done.stderr
    assert "job submitted-2026-11-24-20" in done.stdout and ": SUCCEEDED" in done.stdout
    assert f"{rows} rows: {rows} ok, 0 error in 4/4 shards" in done.stdout, "the job's own log is followed"
    check_output(str(tmp_path / "out" / "2026-11-24"), {f"row-{i:05d}" for i in range(rows)}, 32, 32)

    no_wait = run_cli("submit", str(job), "--address", ray_head, "--no-wait")
    assert no_wait.returncode == 0 and no_wait.stdout.startswith("submitted submitted-"), no_wait.stderr

    # Settings travel in the job's file: no --set value (a secret) on its command line or in its log.
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(ray_head)
    [submitted] = [info for info in client.list_jobs() if info.submission_id in done.stdout]
    assert submitted.entrypoint == "imagemill run job.yaml --no-progress"
    assert SECRET not in client.get_job_logs(submitted.submission_id)
    assert SECRET not in done.stdout + done.stderr


def test_submit_names_an_unreachable_cluster(tmp_path, tiny_model):
    job = tmp_path / "job.yaml"
    job.write_text(
        f"input: {{path: {tmp_path}}}\noutput: {{path: {tmp_path / 'out'}}}\n"
        f"model: {{source: {tiny_model}}}\n"
    )
    address = f"http://127.0.0.1:{_free_port()}"
    done = run_cli("submit", str(job), "--address", address)
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith(f"imagemill: error: cannot reach the Ray cluster at {address}")
    )


def test_the_pool_takes_one_worker_per_gpu_and_grows_when_a_gpu_node_joins(tmp_path, tiny_model, monkeypatch):
    """num_workers unset: one actor per GPU in the cluster (fake GPUs here), more as GPU nodes join."""
    # Long enough (about 20 s on one CPU) that a node joining after the first commit finds work left.
    rows = write_prompt_files(str(tmp_path / "prompts"), n_files=3, rows_per_file=64, row_group_size=4)
    job = tmp_path / "job.yaml"
    job.write_text(
        f"input: {{path: {tmp_path / 'prompts'}, rows_per_shard: 4}}\n"
        f"output: {{path: {tmp_path / 'out'}}}\n"
        f"model: {{source: {tiny_model}}}\n"
        "generation: {width: 64, height: 64, num_inference_steps: 6}\n"
        "workers: {batch_size: 4}\n"
    )
    log_path = tmp_path / "driver.log"
    with isolated_cluster(monkeypatch) as cluster:
        cluster.add_node(num_cpus=1, num_gpus=1, object_store_memory=OBJECT_STORE_BYTES)
        cluster.wait_for_nodes()
        with open(log_path, "w") as log:
            driver = subprocess.Popen(
                [sys.executable, "-m", "imagemill.cli", "run", str(job), "--no-progress"],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "RAY_ADDRESS": cluster.address},
            )  # fmt: skip
        try:
            _wait_for(lambda: list((tmp_path / "out" / "shards").glob("*.json")), 120, "a first commit")
            cluster.add_node(num_cpus=1, num_gpus=1, object_store_memory=OBJECT_STORE_BYTES)
            assert driver.wait(timeout=180) == 0, log_path.read_text()
        finally:
            if driver.poll() is None:
                driver.kill()
    text = log_path.read_text()
    assert "the cluster grew: starting 1 more workers" in text, text
    check_output(str(tmp_path / "out"), {f"row-{i:05d}" for i in range(rows)}, 64, 64)
