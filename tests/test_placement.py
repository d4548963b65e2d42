"""Workers that cannot be placed: the job runs on those that fit, or stops in one line naming the
setting, instead of waiting silently for resources a cluster without an autoscaler never gets.

Each driver is a subprocess joining the module's own cluster: one node of 2 CPUs and no GPU, beside a
head that takes no actors, so the cluster's size is known whatever machine runs the tests.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import OBJECT_STORE_BYTES, check_output, isolated_cluster, write_prompt_files


@pytest.fixture(scope="module")
def two_cpus() -> str:
    """The address of a cluster of one 2-CPU node without GPUs, and no autoscaler; one for the module."""
    with pytest.MonkeyPatch.context() as monkeypatch, isolated_cluster(monkeypatch) as cluster:
        cluster.add_node(num_cpus=2, num_gpus=0, object_store_memory=OBJECT_STORE_BYTES)
        cluster.wait_for_nodes()
        yield cluster.address


def _driver(two_cpus: str, *args: str, **env: str) -> tuple[list[str], dict[str, str]]:
    """`imagemill run ARGS` joining the two-CPU cluster: its command and its environment, plus `env`."""
    command = [sys.executable, "-m", "imagemill.cli", "run", *args]
    return command, {**os.environ, "RAY_ADDRESS": two_cpus, **env}


def _run_on_two_cpus(two_cpus: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    command, environ = _driver(two_cpus, *args, "--no-progress", **env)
    return subprocess.run(command, capture_output=True, text=True, env=environ, timeout=600)


def _job(tmp_path, workers: str, model: str = "{kind: noop}") -> str:
    job = tmp_path / "job.yaml"
    job.write_text(
        f"input: {{path: {tmp_path / 'prompts'}, rows_per_shard: 10}}\n"
        f"output: {{path: {tmp_path / 'out'}}}\n"
        f"model: {model}\n"
        "generation: {width: 16, height: 16}\n"
        f"workers: {workers}\n"
    )
    return str(job)


@pytest.mark.parametrize("can_grow", [False, True])
def test_more_workers_than_fit_run_every_shard_on_those_that_do(two_cpus, tmp_path, can_grow):
    """Without an autoscaler, only the workers that fit are started; with one (IMAGEMILL_WAIT_FOR_RESOURCES
    stands in for it), all are asked for and the job runs on those placed while the third stays pending."""
    rows = write_prompt_files(str(tmp_path / "prompts"), n_files=2, rows_per_file=20, row_group_size=10)
    job = _job(tmp_path, "{num_cpus_per_worker: 1, batch_size: 5}")
    done = _run_on_two_cpus(
        two_cpus, job, "--num-workers", "3", **({"IMAGEMILL_WAIT_FOR_RESOURCES": "1"} if can_grow else {})
    )
    assert done.returncode == 0, done.stderr
    placed = [line for line in done.stderr.splitlines() if "cannot be placed" in line]
    if can_grow:
        assert not placed and "3 workers × (1 CPU) asked for, 2 fit now" in done.stderr, done.stderr
    else:
        [line] = placed
        assert "1 of 3 workers cannot be placed (the cluster has 2 CPU, no autoscaler); running on 2" in line
    assert f"{rows} rows: {rows} ok, 0 error in 4/4 shards" in done.stdout
    check_output(str(tmp_path / "out"), {f"row-{i:05d}" for i in range(rows)}, 16, 16)


@pytest.mark.parametrize(
    ("workers", "model", "setting"),
    [
        ("{num_cpus_per_worker: 1}", "{kind: noop, device: cuda}", "change model.device"),
        ("{num_cpus_per_worker: 3}", "{kind: noop}", "change workers.num_cpus_per_worker (at most 2 here)"),
    ],
)
def test_workers_that_fit_nowhere_stop_the_job_in_one_line(two_cpus, tmp_path, workers, model, setting):
    write_prompt_files(str(tmp_path / "prompts"), n_files=1, rows_per_file=10, row_group_size=10)
    done = _run_on_two_cpus(two_cpus, _job(tmp_path, workers, model))
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("imagemill: error:")]
    assert len(errors) == 1 and "no worker can be placed" in errors[0] and setting in errors[0], done.stderr
    assert "the cluster has 2 CPU and no autoscaler" in errors[0]
    assert "Traceback" not in done.stderr


def test_a_cluster_that_can_grow_is_waited_for_visibly(two_cpus, tmp_path):
    """IMAGEMILL_WAIT_FOR_RESOURCES (or a running autoscaler): the GPU workers are waited for, logged."""
    write_prompt_files(str(tmp_path / "prompts"), n_files=1, rows_per_file=10, row_group_size=10)
    job = _job(tmp_path, "{num_workers: 2}", "{kind: noop, device: cuda}")
    command, environ = _driver(two_cpus, job, IMAGEMILL_WAIT_FOR_RESOURCES="1")
    driver = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=environ
    )
    try:
        for line in driver.stderr:
            if "waiting for the cluster to grow" in line:
                break
        else:
            pytest.fail("the driver ended without saying it waits for the cluster")
        assert "2 workers × (1 CPU, 1 GPU) asked for, 0 fit now" in line
        assert driver.poll() is None, "the driver must keep waiting"
    finally:
        driver.kill()
        driver.wait()
