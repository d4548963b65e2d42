"""`workers.gpus_per_worker` on a cluster of logical GPUs: actors sharing a GPU, a replica spanning two
as a gang, a replica no node can hold, and a gang member killed mid-shard.

Each driver is a subprocess joining the module's own cluster: one node of 4 CPUs and 2 logical GPUs
(Ray counts them; torch finds no CUDA, so the actors run on the CPU and a gang joins over gloo), beside
a head that takes no actors. Each job ends with the exactly-once check (`check_output`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import OBJECT_STORE_BYTES, check_output, isolated_cluster, write_prompt_files

from imagemill.core.layout import OutputLayout
from imagemill.core.records import committed_shards

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def two_gpus() -> str:
    """The address of a cluster of one node of 4 CPUs and 2 logical GPUs, and no autoscaler."""
    with pytest.MonkeyPatch.context() as monkeypatch, isolated_cluster(monkeypatch) as cluster:
        cluster.add_node(num_cpus=4, num_gpus=2, object_store_memory=OBJECT_STORE_BYTES)
        cluster.wait_for_nodes()
        yield cluster.address


def _job(tmp_path: Path, workers: str, model: str = "{kind: noop}") -> str:
    job = tmp_path / "job.yaml"
    job.write_text(
        f"input: {{path: {tmp_path / 'prompts'}, rows_per_shard: 4}}\n"
        f"output: {{path: {tmp_path / 'out'}}}\n"
        f"model: {model}\n"
        "generation: {width: 16, height: 16}\n"
        f"workers: {workers}\n"
    )
    return str(job)


def _driver(address: str, job: str, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "imagemill.cli", "run", job, "--no-progress"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "RAY_ADDRESS": address},
        )


def _run(address: str, tmp_path: Path, job: str) -> tuple[int, str]:
    driver = _driver(address, job, tmp_path / "driver.log")
    try:
        code = driver.wait(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
    return code, (tmp_path / "driver.log").read_text()


def _ids(rows: int) -> set[str]:
    return {f"row-{i:05d}" for i in range(rows)}


def test_half_a_gpu_each_puts_two_actors_on_every_gpu(two_gpus, tmp_path):
    rows = write_prompt_files(str(tmp_path / "prompts"), n_files=1, rows_per_file=40, row_group_size=4)
    code, log = _run(two_gpus, tmp_path, _job(tmp_path, "{gpus_per_worker: 0.5, batch_size: 4}"))
    assert code == 0, log
    assert "placement: 4 actors on 2 GPUs (0.5 GPU each, 2 per GPU)" in log, log
    check_output(str(tmp_path / "out"), _ids(rows), 16, 16)
    stats = committed_shards(OutputLayout(str(tmp_path / "out"))).values()
    assert len({shard.worker for shard in stats}) == 4, log  # 4 actors on 2 GPUs, each committing
    # each actor holds half a GPU: its device time counts half (imagemill.core.cost); none here is CUDA
    assert {shard.device for shard in stats} == {"cpu"}


def test_a_replica_no_node_can_hold_stops_the_job_in_one_line(two_gpus, tmp_path):
    write_prompt_files(str(tmp_path / "prompts"), n_files=1, rows_per_file=4, row_group_size=4)
    job = _job(tmp_path, "{gpus_per_worker: 4}", "{kind: noop, parallel: context}")
    code, log = _run(two_gpus, tmp_path, job)
    assert code == 2, log
    errors = [line for line in log.splitlines() if line.startswith("imagemill: error:")]
    assert len(errors) == 1, log
    setting = "workers.gpus_per_worker: 4 but no node has 4 GPUs; largest has 2: lower it or add a node"
    assert setting in errors[0], errors
    assert "Traceback" not in log


def _busy_actor(call: str) -> int | None:
    """The pid of a ShardWorkerActor process running `call` now (Ray titles a busy actor's process
    `ray::ShardWorkerActor.<method>`)."""
    for process in psutil.Process().children(recursive=True):
        try:
            if (process.cmdline() or [""])[0] == f"ray::ShardWorkerActor.{call}":
                return process.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return None


def _kill_mid_shard(driver: subprocess.Popen, out: Path, log: Path, call: str, commits: int) -> int:
    """SIGKILL the actor running `call` once `commits` shards are committed; the shards committed then."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and driver.poll() is None:
        done = len(list((out / "shards").glob("*.json")))
        if done >= commits and (pid := _busy_actor(call)):
            os.kill(pid, signal.SIGKILL)
            return done
        time.sleep(0.05)
    raise AssertionError(f"no actor ran {call} after {commits} commits: {log.read_text()}")


def test_a_gang_of_two_runs_exactly_once_and_a_killed_member_retries_its_shard_once(two_gpus, tmp_path):
    """`gpus_per_worker: 2` with `model.parallel: context`: one gang of 2 actors on the node's 2 GPUs.
    SIGKILL its follower mid-shard, then (once the gang is placed again and commits) its leader: each
    time the whole gang is torn down and placed again, the shards it ran are tried once more, and
    every row is written once, by the leader."""
    rows = write_prompt_files(str(tmp_path / "prompts"), n_files=1, rows_per_file=48, row_group_size=4)
    model = "{kind: emulated, emulation: {images_per_second: 8}, parallel: context}"
    job = _job(tmp_path, "{gpus_per_worker: 2, batch_size: 2}", model)
    out = tmp_path / "out"
    log = tmp_path / "driver.log"
    driver = _driver(two_gpus, job, log)
    try:
        first = _kill_mid_shard(driver, out, log, "follow_shard", 1)
        _kill_mid_shard(driver, out, log, "process_shard", first + 1)
        assert driver.wait(timeout=240) == 0, log.read_text()
    finally:
        if driver.poll() is None:
            driver.kill()
    text = log.read_text()
    assert "placement: 1 replica × 2 GPUs (gang of 2), 1 actor per GPU" in text, text
    # Each kill tears the gang down once. The follower's death is seen in a collective ("a gang member
    # is gone"), or, when it died after the shard's last one, by its shard call ("the gang fell out of
    # step in shard ...: ActorDiedError"); or gloo aborts the leader's process, as it may when a peer is
    # SIGKILLed mid-write (pytorch/pytorch#50701), and the leader's death is seen. The second is the leader's.
    broke = r"a gang broke \(GangBroken: (?:a gang member is gone|the gang fell out of step in shard)"
    teardown = rf"^.*({broke}|a worker died \(ActorDiedError).*; starting a replacement$"
    teardowns = re.findall(teardown, text, re.M)
    assert len(teardowns) == 2 and teardowns[1].startswith("a worker died"), text
    check_output(str(out), _ids(rows), 16, 16)
    stats = committed_shards(OutputLayout(str(out))).values()
    leaders = {shard.worker for shard in stats}  # imagemill:<job>:<run>:<n>; a follower's name ends .<rank>
    assert len(leaders) >= 2 and not any("." in name.rsplit(":", 1)[1] for name in leaders), leaders
    failed = {path.stem: json.loads(path.read_text())["failed"] for path in (out / "attempts").glob("*.json")}
    # per kill, the shard the gang drew and the one its leader was reading: one failed try each
    assert 2 <= len(failed) <= 4 and all(len(tries) == 1 for tries in failed.values()), failed


@pytest.mark.model
def test_a_context_parallel_gang_draws_the_one_process_images(two_gpus, tmp_path):
    """`gpus_per_worker: 2, parallel: context` with a tiny FLUX and sampled prompt expansion: the gang
    meets before it loads, so its denoiser splits each image's tokens over both members (the ready
    line says so), the follower draws from the leader's expanded prompts, and its images are the
    one-process job's within the determinism rule (a level, in a few pixels)."""
    import numpy as np
    from PIL import Image

    import imagemill
    from imagemill.testing.in_process import run_in_process
    from imagemill.testing.tiny_families import make_tiny_family
    from imagemill.testing.tiny_lm import make_tiny_lm

    flux = make_tiny_family("flux", tmp_path / "flux")
    lm = make_tiny_lm(tmp_path / "lm")
    rows = write_prompt_files(str(tmp_path / "prompts"), n_files=1, rows_per_file=4, row_group_size=4)
    model = f"{{source: {flux}, parallel: context}}"
    job = _job(tmp_path, "{gpus_per_worker: 2, batch_size: 2}", model)
    Path(job).write_text(
        Path(job)
        .read_text()
        .replace("{width: 16, height: 16}", "{width: 64, height: 32, num_inference_steps: 2}")
        # only the leader expands: without its prompts, a follower draws from the unexpanded ones
        + f"expansion: {{source: {lm}, max_new_tokens: 8, do_sample: true, top_p: 0.9}}\n"
    )
    code, log = _run(two_gpus, tmp_path, job)
    assert code == 0, log
    assert "each image's tokens over 2 processes" in log, log
    check_output(str(tmp_path / "out"), _ids(rows), 64, 32)

    alone = tmp_path / "alone.yaml"
    alone.write_text(
        Path(job).read_text().replace(", parallel: context", "").replace("gpus_per_worker: 2, ", "")
        .replace(str(tmp_path / "out"), str(tmp_path / "alone"))
    )  # fmt: skip
    assert run_in_process(imagemill.load_spec(alone)).complete
    for image in sorted((tmp_path / "alone" / "images").rglob("*.png")):
        gang = np.asarray(Image.open(tmp_path / "out" / image.relative_to(tmp_path / "alone")), dtype=int)
        difference = np.abs(gang - np.asarray(Image.open(image), dtype=int))
        assert difference.max() <= 1 and (difference > 0).mean() < 0.05, image
