"""Jobs on a Ray cluster: submitted through the Jobs API, and a worker pool that follows the cluster."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import (
    OBJECT_STORE_BYTES,
    check_output,
    isolated_cluster,
    make_bucket,
    run_cli,
    write_prompt_files,
)
from doc_pages import command

from imagemill.reporting.status import STATUS_EXIT_CODES

SECRET = "sk-imagemill-submitted-secret"
TOKEN = "0123456789abcdef0123456789abcdef"  # the test cluster's authentication token
TOKEN_ENV = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN}
REPO = Path(__file__).resolve().parent.parent
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


@dataclass
class Head:
    """A cluster started by `ray start --head`: its dashboard on loopback and on the node's address."""

    local: str  # http://127.0.0.1:PORT: the client's filesystem is the cluster's
    remote: str  # http://NODE-IP:PORT: seen as a remote cluster, which gets local files uploaded


# `ray start`, taking Ctrl-C even where the suite runs in the background (which starts children with
# SIGINT ignored): the cluster below is stopped by it.
RAY_START = """\
import signal, sys
from ray.scripts.scripts import main
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.argv = ["ray", *sys.argv[1:]]
main()
"""


@pytest.fixture(scope="module")
def _head(s3_endpoint):
    """A separate single-node cluster started the way users start one: `ray start --head` from a
    virtualenv that is not activated (its bin/ not on PATH), with token authentication on. One for the
    module: starting and stopping a cluster is most of what a test of it costs."""
    from ray.util import get_node_ip_address

    dashboard_port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    recorded = CURRENT_CLUSTER.read_text() if CURRENT_CLUSTER.exists() else None
    venv_bin = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != venv_bin)
    # RAY_AUTH_MODE=token with the token in RAY_AUTH_TOKEN: `ray start` turns token authentication on
    # (ray/_private/authentication); `ray_head` gives the client (each test's imagemill submit) the token.
    environ = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_TOKEN_PATH"}
    head = subprocess.Popen(
        [sys.executable, "-c", RAY_START, "start", "--head", "--block", f"--port={_free_port()}",
         "--num-cpus=2", f"--dashboard-port={dashboard_port}", "--dashboard-host=0.0.0.0",
         "--include-dashboard=true", f"--object-store-memory={OBJECT_STORE_BYTES}", f"--temp-dir={temp_dir}",
         # Free ports for what defaults to fixed ones, which the session Ray on this machine holds.
         *(f"--{name}={_free_port()}" for name in AGENT_PORTS)],
        env={**environ, "PATH": path, **TOKEN_ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        local = f"http://127.0.0.1:{dashboard_port}"
        _wait_for(lambda: _answers(f"{local}/api/version"), 120, "the Ray dashboard")
        yield Head(local=local, remote=f"http://{get_node_ip_address()}:{dashboard_port}")
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


@pytest.fixture
def ray_head(_head, monkeypatch) -> Head:
    """The module's token cluster, with this test's client holding the token."""
    for name, value in TOKEN_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    return _head


def test_submit_runs_a_job_through_the_jobs_api(ray_head, tmp_path):
    """The submission itself (the demo's model runs on this cluster in the test below): the noop kind."""
    rows = write_prompt_files(str(tmp_path / "prompts"), n_files=2, rows_per_file=8, row_group_size=4)
    job = tmp_path / "job.yaml"
    job.write_text(
        "name: submitted-{date}\n"
        f"input: {{path: {tmp_path / 'prompts'}, rows_per_shard: 4}}\n"
        f"output:\n  path: {tmp_path / 'out' / '{date}'}\n"
        "model: {kind: noop}\n"
        "generation: {width: 32, height: 32, num_inference_steps: 1}\n"
        "workers: {num_workers: 1, batch_size: 4}\n"
    )
    secret = f"--set input.storage_options.secret_token={SECRET}"  # local fsspec takes any option
    done = run_cli(
        "submit", str(job), "--address", ray_head.local, "--date", "2026-11-24",
        "--set", "workers.batch_size=2", *secret.split(" "),
    )  # fmt: skip

    assert done.returncode == 0, done.stdout + done.stderr
    assert "job submitted-2026-11-24-20" in done.stdout and ": SUCCEEDED" in done.stdout
    assert f"{rows} rows: {rows} ok, 0 error in 4/4 shards" in done.stdout, "the job's own log is followed"
    check_output(str(tmp_path / "out" / "2026-11-24"), {f"row-{i:05d}" for i in range(rows)}, 32, 32)

    no_wait = run_cli("submit", str(job), "--address", ray_head.local, "--no-wait")
    assert no_wait.returncode == 0 and no_wait.stdout.startswith("submitted submitted-"), no_wait.stderr

    # Settings travel in the job's file: no --set value (a secret) on its command line or in its log.
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(ray_head.local, headers={"Authorization": f"Bearer {TOKEN}"})
    [submitted] = [info for info in client.list_jobs() if info.submission_id in done.stdout]
    assert submitted.entrypoint.endswith(" -m imagemill.cli run job.yaml --no-progress")
    assert SECRET not in client.get_job_logs(submitted.submission_id)
    assert SECRET not in done.stdout + done.stderr
    client.stop_job(no_wait.stdout.split()[1])  # the module's next tests share the cluster


def _demo_copy(folder: Path, rows: int | None = None) -> Path:
    """The shipped demo (jobs/demo.yaml unchanged, its prompts and model) in a folder of its own, so
    its relative paths and its local output resolve there and not in this checkout; `rows`: only the
    first so many prompts, for a test whose point is not the demo's output."""
    for name in ("demo.yaml", "demo_prompts.parquet"):
        (folder / "jobs").mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / "jobs" / name, folder / "jobs" / name)
    if rows is not None:
        prompts = folder / "jobs" / "demo_prompts.parquet"
        pq.write_table(pq.read_table(prompts).slice(0, rows), prompts)
    shutil.copytree(REPO / "jobs" / "models" / "demo-shapes", folder / "jobs" / "models" / "demo-shapes")
    return folder


def _demo_ids(folder: Path = REPO) -> set[str]:
    return set(pq.read_table(folder / "jobs" / "demo_prompts.parquet", columns=["id"])["id"].to_pylist())


def _home_with_token(home: Path, token: str | None, monkeypatch) -> None:
    """The client as a user's shell is after `ray start --head`: the token (if any) only in
    ~/.ray/auth_token, where Ray leaves it, and neither RAY_AUTH_MODE nor RAY_AUTH_TOKEN set."""
    (home / ".ray").mkdir(parents=True)
    if token is not None:
        (home / ".ray" / "auth_token").write_text(token)
    monkeypatch.setenv("HOME", str(home))
    for name in TOKEN_ENV:
        monkeypatch.delenv(name)


def test_the_shipped_demo_submitted_as_is_succeeds_on_a_token_cluster(ray_head, tmp_path, monkeypatch):
    """The cluster guide's command (docs/cluster.md), on this test's cluster: `imagemill submit
    jobs/demo.yaml --address http://127.0.0.1:8265`, from a shell that has only the token `ray start`
    left in ~/.ray (Ray 2.60 turns token authentication on by default). On this machine the cluster
    shares the filesystem: the relative input, model and output mean the client's."""
    _home_with_token(tmp_path / "home", TOKEN, monkeypatch)
    words = " ".join(command("docs/cluster.md", r"ray start --head")).split(" && ")[1].split()
    assert words[:4] == ["imagemill", "submit", "jobs/demo.yaml", "--address"]
    assert words[4].startswith("http://127.0.0.1:")
    demo = _demo_copy(tmp_path / "demo")
    done = run_cli(*words[1:4], ray_head.local, cwd=demo)
    assert done.returncode == 0 and ": SUCCEEDED" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    check_output(str(demo / "output" / "demo"), _demo_ids(), 32, 32)
    assert len(list((demo / "output" / "demo" / "images").rglob("*.png"))) == 64

    # Right after --no-wait, status says the job is submitted (this one never starts: its pip
    # package does not exist, so Ray cannot set up its environment).
    later = ["--set", "output.path=output/later", "--pip", str(tmp_path / "missing-0.0.0-py3-none-any.whl")]
    no_wait = run_cli("submit", "jobs/demo.yaml", "--address", ray_head.local, "--no-wait", *later, cwd=demo)
    assert no_wait.returncode == 0 and no_wait.stdout.startswith("submitted demo-"), no_wait.stderr
    status = run_cli("status", str(demo / "output" / "later"))
    assert status.returncode == STATUS_EXIT_CODES["submitted, not started"], status.stderr
    assert "job demo at " in status.stdout and ": submitted, not started (Ray job demo-" in status.stdout


def test_a_remote_cluster_gets_the_local_input_and_model_uploaded(ray_head, tmp_path):
    """Through the node's address the cluster counts as remote: the demo's local prompts and model go
    with the job (its working directory), and a local output is refused unless it is shared."""
    demo = _demo_copy(tmp_path / "demo", rows=16)
    refused = run_cli("submit", "jobs/demo.yaml", "--address", ray_head.remote, cwd=demo)
    assert refused.returncode == 2
    assert (
        refused.stderr.strip()
        .splitlines()[-1]
        .startswith(f"imagemill: error: output.path {demo / 'output' / 'demo'} is a local path")
    ), refused.stderr
    assert "--shared-path" in refused.stderr

    output = f"{make_bucket('remote-demo')}/demo"
    settings = ["--set", f"output.path={output}", "--set", "workers.num_workers=1"]  # 16 rows: one shard
    done = run_cli("submit", "jobs/demo.yaml", "--address", ray_head.remote, *settings, cwd=demo)
    assert done.returncode == 0 and ": SUCCEEDED" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    check_output(output, _demo_ids(demo), 32, 32)
    import s3fs

    record = json.loads(s3fs.S3FileSystem().cat_file(f"{output}/_job.json"))
    for uploaded in (record["spec"]["input"]["path"], record["spec"]["model"]["source"]):
        assert "/uploaded/" in uploaded and "_ray_pkg_" in uploaded, uploaded  # the job's copies


def test_a_cluster_with_token_authentication_names_what_the_client_needs(ray_head, tmp_path, monkeypatch):
    """No token on this machine (or another cluster's): one short line saying what to set."""
    demo = _demo_copy(tmp_path / "demo", rows=16)
    for home, token in ((tmp_path / "no-token", None), (tmp_path / "other-token", "f" * 32)):
        with monkeypatch.context() as patched:
            _home_with_token(home, token, patched)
            done = run_cli("submit", "jobs/demo.yaml", "--address", ray_head.local, cwd=demo)
        assert done.returncode == 2, done.stderr
        line = done.stderr.strip().splitlines()[-1]
        assert line.startswith(f"imagemill: error: cannot reach the Ray cluster at {ray_head.local}: "), line
        assert "RAY_AUTH_MODE=token" in line and "RAY_AUTH_TOKEN" in line and "RAY_AUTH_TOKEN_PATH" in line
        assert len(line) < 300, line  # not Ray's paragraph


def test_a_local_output_for_a_remote_cluster_is_refused_before_contacting_it(tmp_path, tiny_model):
    job = tmp_path / "job.yaml"
    job.write_text(f"input: {{path: {tmp_path}}}\noutput: {{path: out}}\nmodel: {{source: {tiny_model}}}\n")
    address = "http://ray-head.example.internal:8265"
    refused = run_cli("submit", str(job), "--address", address, cwd=tmp_path)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        f"imagemill: error: output.path {tmp_path / 'out'} is a local path: the job on {address} would "
        "write it on the node it runs on; use a URL (s3://...), or pass --shared-path if it is storage "
        "mounted at the same place on every node"
    )
    shared = run_cli("submit", str(job), "--address", address, "--shared-path", cwd=tmp_path)
    assert shared.returncode == 2 and "cannot reach the Ray cluster at" in shared.stderr, shared.stderr


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
    # Long enough (about 15 s on one CPU) that a node joining after the first commit finds work left.
    rows = write_prompt_files(str(tmp_path / "prompts"), n_files=2, rows_per_file=64, row_group_size=4)
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
