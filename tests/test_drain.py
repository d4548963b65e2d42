"""A node being drained (a spot node's preemption notice, `ray drain-node`): it gets no new shard, a shard
in flight there that cannot finish before the deadline is handed back at once without counting as a
try, and the job still commits every row exactly once; with every node drained the run stops, resumably.

Drains go through Ray's own command (`ray drain-node`, as KubeRay and the spot handlers' call to the
GCS) against a `ray.cluster_utils.Cluster` of two one-CPU worker nodes beside a head that takes no actors.
`workers.max_shard_attempts: 1`, so a hand-back that counted as a try would fail its shard.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from conftest import OBJECT_STORE_BYTES, check_output, isolated_cluster, write_prompt_files

pytestmark = pytest.mark.cluster

ROWS = 144  # 9 shards of 16 rows, each about 2 s on an emulated device of 8 images/s
SHARDS = ROWS // 16
READY = re.compile(r"is ready on cpu \(\d of \d\): (\S+) on node (\w{8})")
DRAIN = re.compile(
    r"^(\S+ \S+) WARNING .*node (\w{8}) is being drained \(([^;]*);.*handed back: (.*); finishing there",
    re.M,
)


@pytest.fixture(scope="module")
def cluster():
    """A head that takes no actors; each test adds (and drains) its own worker nodes."""
    with pytest.MonkeyPatch.context() as monkeypatch, isolated_cluster(monkeypatch) as started:
        yield started


def _job(tmp_path: Path, workers: int) -> str:
    write_prompt_files(str(tmp_path / "prompts"), n_files=3, rows_per_file=ROWS // 3, row_group_size=16)
    job = tmp_path / "job.yaml"
    spec = {
        "name": "drain",
        "input": {"path": str(tmp_path / "prompts"), "rows_per_shard": 16},
        "output": {"path": str(tmp_path / "out")},
        "model": {"kind": "emulated", "emulation": {"images_per_second": 8, "launch_ms_per_step": 0}},
        "generation": {"width": 16, "height": 16},
        "workers": {"num_workers": workers, "batch_size": 8, "max_shard_attempts": 1},
    }
    job.write_text(yaml.safe_dump(spec))
    return str(job)


def _start(cluster, job: str, log_path: Path) -> subprocess.Popen:
    with open(log_path, "w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "imagemill.cli", "run", job, "--no-progress"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "RAY_ADDRESS": cluster.address},
        )


def _wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _drain(cluster, node_id: str, seconds: int) -> subprocess.Popen:
    """What a spot handler sends: a preemption notice with its deadline (`wait()` for its answer)."""
    return subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "drain-node", "--address", cluster.address,
         "--node-id", node_id, "--reason", "DRAIN_NODE_REASON_PREEMPTION",
         "--reason-message", "spot instance reclaimed", "--deadline-remaining-seconds", str(seconds)],
    )  # fmt: skip


def _stats(output: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted((output / "shards").glob("*.json"))]


def _job_record(output: Path) -> dict:
    return json.loads((output / "_job.json").read_text())


def _ready_workers(log_path: Path, count: int, committed: bool = True) -> dict[str, str] | None:
    """{worker name: node (short id)} once `count` workers are ready and (`committed`) a shard is
    committed."""
    text = log_path.read_text()
    workers = dict(READY.findall(text))
    return workers if len(workers) == count and (" done: " in text or not committed) else None


def _noticed(when: str) -> float:
    """A driver log line's time (local, as logging writes it) in seconds since the epoch."""
    return datetime.strptime(when, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def test_drained_nodes_get_no_new_shard_and_hand_back_what_cannot_finish(cluster, tmp_path):
    """Three one-worker nodes; one is drained with its deadline already past, one with a far deadline.
    The first hands its shards in flight back at once, each committed once by another worker; the
    second finishes its own there. Neither starts a shard after its notice, no try is counted (one
    allowed), and each drain is one line and counted in `_job.json`."""
    nodes = [cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE_BYTES) for _ in range(3)]
    cluster.wait_for_nodes()
    log_path, output = tmp_path / "driver.log", tmp_path / "out"
    driver = _start(cluster, _job(tmp_path, 3), log_path)
    try:
        # drained as soon as the three are ready, not after a commit: the notices arrive a few seconds
        # later (the command's start, the driver's 2 s poll), and a notice after the job's second
        # round of shards found the drained node with nothing in flight to hand back
        workers = _wait_for(
            lambda: _ready_workers(log_path, 3, committed=False) or driver.poll() is not None,
            120,
            "three ready workers",
        )
        assert driver.poll() is None, log_path.read_text()
        worker_of = {node: name for name, node in workers.items()}
        past, far, _ = nodes  # a worker on each
        notices = [_drain(cluster, past.node_id, 0), _drain(cluster, far.node_id, 120)]
        assert [notice.wait(timeout=60) for notice in notices] == [0, 0]
        assert driver.wait(timeout=120) == 0, log_path.read_text()
    finally:
        if driver.poll() is None:
            driver.kill()
        for node in nodes:  # the cloud takes a drained node at its deadline; the test takes the rest
            cluster.remove_node(node)
    text = log_path.read_text()
    drains = {short: (when, deadline, back) for when, short, deadline, back in DRAIN.findall(text)}
    assert set(drains) == {past.node_id[:8], far.node_id[:8]}, text
    replacements = [node for _, node in READY.findall(text)[3:]]  # none placed on a draining node
    assert not {past.node_id[:8], far.node_id[:8]} & set(replacements), text
    stats = {record["shard_id"]: record for record in _stats(output)}
    for node in (past, far):
        when, _, _ = drains[node.node_id[:8]]
        started = [
            s["timeline"]["read"][0] for s in stats.values() if s["worker"] == worker_of[node.node_id[:8]]
        ]
        assert all(start < _noticed(when) for start in started), (when, started)
    _, deadline, back = drains[past.node_id[:8]]
    assert deadline == "deadline already past" and back != "none", text
    for shard_id in back.split(", "):  # committed once, by another worker; the try not counted
        assert stats[shard_id]["worker"] != worker_of[past.node_id[:8]]
        [attempt] = json.loads((output / "attempts" / f"{shard_id}.json").read_text())["failed"]
        assert attempt["error"].startswith(f"handed back: node {past.node_id[:8]} is being drained"), attempt
    _, deadline, back = drains[far.node_id[:8]]
    assert deadline.startswith("deadline in ") and back == "none", text
    record = _job_record(output)
    assert record["nodes_drained"] == 2
    assert record["failed_shards"] == [] and record["status"] == "complete"
    assert not (output / "_staging").exists() or not any((output / "_staging").rglob("*"))
    check_output(str(output), {f"row-{i:05d}" for i in range(ROWS)}, 16, 16)


def test_with_every_node_drained_the_run_stops_in_one_line_and_resumes(cluster, tmp_path):
    """The only worker node drained: nothing more is handed out, the run ends incomplete (exit 1) saying
    so in one line, and the same command once a node has come up finishes the job, every row once."""
    node = cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE_BYTES)
    cluster.wait_for_nodes()
    log_path, output = tmp_path / "driver.log", tmp_path / "out"
    job = _job(tmp_path, 1)
    driver = _start(cluster, job, log_path)
    try:
        _wait_for(lambda: _ready_workers(log_path, 1) or driver.poll() is not None, 120, "a ready worker")
        assert driver.poll() is None, log_path.read_text()
        assert _drain(cluster, node.node_id, 0).wait(timeout=60) == 0
        assert driver.wait(timeout=120) == 1, log_path.read_text()
    finally:
        if driver.poll() is None:
            driver.kill()
        cluster.remove_node(node)
    text = log_path.read_text()
    [line] = [
        line for line in text.splitlines() if "every node that can run a worker is being drained" in line
    ]
    assert "run the same command again to resume" in line
    record = _job_record(output)
    assert record["status"] == "incomplete" and record["nodes_drained"] == 1 and record["failed_shards"] == []
    assert record["shards_done"] < SHARDS
    fresh = cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE_BYTES)
    cluster.wait_for_nodes()
    try:
        resumed = _start(cluster, job, tmp_path / "resumed.log")
        assert resumed.wait(timeout=120) == 0, (tmp_path / "resumed.log").read_text()
    finally:
        cluster.remove_node(fresh)
    check_output(str(output), {f"row-{i:05d}" for i in range(ROWS)}, 16, 16)


def test_a_drained_driver_node_stops_the_run_resumably(tmp_path, monkeypatch):
    """The head, where the driver runs, drained: Ray releases it at once and the actors the driver owns
    die with it. The run hands every shard back (no try counted: none is failed, so the same command
    resumes it, as the test above shows) and ends incomplete (exit 1) in one line. Its own cluster: the
    head's raylet is gone afterwards."""
    log_path, output = tmp_path / "driver.log", tmp_path / "out"
    job = _job(tmp_path, 1)
    with isolated_cluster(monkeypatch) as own:
        own.add_node(num_cpus=1, object_store_memory=OBJECT_STORE_BYTES)
        own.wait_for_nodes()
        driver = _start(own, job, log_path)
        try:
            _wait_for(lambda: _ready_workers(log_path, 1) or driver.poll() is not None, 120, "a ready worker")
            assert driver.poll() is None, log_path.read_text()
            assert _drain(own, own.head_node.node_id, 30).wait(timeout=60) == 0
            assert driver.wait(timeout=120) == 1, log_path.read_text()
        finally:
            if driver.poll() is None:
                driver.kill()
        text = log_path.read_text()
        [line] = [line for line in text.splitlines() if "the node this driver runs on" in line]
        assert "run the same command again, from a node that stays, to resume" in line, line
        record = _job_record(output)
        assert (
            record["status"] == "incomplete"
            and record["nodes_drained"] >= 1
            and record["failed_shards"] == []
        )
