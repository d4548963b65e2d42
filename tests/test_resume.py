"""A killed job is simply run again: nothing lost, nothing twice, the same bytes as an unbroken run.

The killed drivers and the re-run are real drivers on Ray; the unbroken reference, and the claim and
resume rules after them, run the real driver with its shards in process (testing.in_process)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path
from subprocess import DEVNULL

import pyarrow.parquet as pq
import pytest
from conftest import check_output, prompt_table, read_metadata, run_cli, write_prompt_files

import imagemill
from imagemill.core.errors import ImagemillError
from imagemill.testing.in_process import run_in_process

JOB = """\
name: resume-test
input: {{path: {input}, rows_per_shard: 16}}
output: {{path: {output}}}
model: {model}
generation: {{width: 32, height: 32, num_inference_steps: 1, guidance_scale: 3.0}}
workers: {{num_workers: 2, batch_size: 4}}
"""


def _write_job(path: Path, input_dir: Path, output: Path, model: str) -> Path:
    path.write_text(JOB.format(input=input_dir, output=output, model=model))
    return path


def _commits(output: Path) -> int:
    return len(list((output / "shards").glob("*.json")))


def _wait_for_commits(output: Path, count: int, driver: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while _commits(output) < count:
        assert driver.poll() is None, "the driver ended on its own"
        assert time.time() < deadline, f"fewer than {count} shards committed after {timeout} s"
        time.sleep(0.05)


def test_driver_killed_five_times_then_rerun_gives_every_row_once_and_the_same_bytes(ray_address, tmp_path):
    """The subject is the driver and the commits, so the model is the noop kind (no model to load: a
    kill cycle takes seconds); every file still embeds its row's parameters, so each image's bytes are
    its row's. A killed driver with a real model is taken over byte-identically in test_lease."""
    rows = write_prompt_files(str(tmp_path / "prompts"), n_files=12, rows_per_file=128, row_group_size=8)
    shards = rows // 16
    ids = {f"row-{i:05d}" for i in range(rows)}
    noop = "{kind: noop}"
    unbroken = _write_job(tmp_path / "unbroken.yaml", tmp_path / "prompts", tmp_path / "unbroken", noop)
    assert run_in_process(imagemill.load_spec(unbroken)).complete
    expected = check_output(str(tmp_path / "unbroken"), ids, 32, 32)

    job = _write_job(tmp_path / "job.yaml", tmp_path / "prompts", tmp_path / "out", noop)
    command = [sys.executable, "-m", "imagemill.cli", "run", str(job), "--no-progress"]
    rng = random.Random(20261124)
    kills = []
    for _ in range(5):
        driver = subprocess.Popen(
            command, env={**os.environ, "RAY_ADDRESS": ray_address}, stdout=DEVNULL, stderr=DEVNULL
        )
        # A random point: during planning or actor start-up, or just after 1 or 2 more shards have
        # been committed, plus up to 0.2 s, which lands in the middle of the next shards.
        more = rng.choice([0, 1, 1, 2])
        if more == 0:
            time.sleep(rng.uniform(0.2, 5.0))
        else:
            _wait_for_commits(tmp_path / "out", _commits(tmp_path / "out") + more, driver)
            time.sleep(rng.uniform(0.0, 0.2))
        driver.kill()  # SIGKILL: no cleanup of any kind
        driver.wait()
        assert driver.returncode == -9, f"the job finished before it was killed: make it longer {kills}"
        kills.append((more, _commits(tmp_path / "out")))
    assert sum(1 for more, _ in kills if more) >= 3, kills  # 4 of the 5 with this seed
    assert kills[-1][1] < shards, f"every shard was done before the last kill: make the job longer {kills}"

    done = run_cli("run", str(job), "--no-progress", ray_address=ray_address)
    assert done.returncode == 0, done.stderr
    assert f"{rows} rows: {rows} ok, 0 error in {shards}/{shards} shards" in done.stdout
    assert check_output(str(tmp_path / "out"), ids, 32, 32) == expected


def _spec(tmp_path: Path, model: str, **generation):
    return imagemill.build_spec(
        {
            "input": {"path": str(tmp_path / "prompts"), "rows_per_shard": 4},
            "output": {"path": str(tmp_path / "out")},
            "model": {"source": model},
            "generation": {"width": 32, "height": 32, "num_inference_steps": 1, **generation},
            "workers": {"num_workers": 1, "batch_size": 4},
        }
    )


def test_a_changed_spec_is_refused_unless_overwrite(tmp_path, tiny_model):
    write_prompt_files(str(tmp_path / "prompts"), n_files=1, rows_per_file=8, row_group_size=4)
    assert run_in_process(_spec(tmp_path, tiny_model)).complete

    changed = _spec(tmp_path, tiny_model, width=40, seed=5)
    with pytest.raises(ImagemillError, match=r"generation\.seed, generation\.width changed.*--overwrite"):
        run_in_process(changed)
    assert set(read_metadata(str(tmp_path / "out")).column("width").to_pylist()) == {32}

    # The CLI says the same in one line, and exits 2.
    job = tmp_path / "job.yaml"
    _write_job(job, tmp_path / "prompts", tmp_path / "out", f"{{source: {tiny_model}}}")

    refused = run_cli("run", str(job), "--set", "input.rows_per_shard=4", "--set", "generation.width=40")
    assert refused.returncode == 2
    assert refused.stderr.strip().count("\n") == 0 and "--overwrite" in refused.stderr

    # Settings that do not decide the output may change: workers, retries, storage options.
    assert run_in_process(_spec(tmp_path, tiny_model)).shards_run == 0

    result = run_in_process(changed, overwrite=True)
    assert result.complete and result.shards_run == 2
    check_output(str(tmp_path / "out"), {f"row-{i:05d}" for i in range(8)}, 40, 32)


def test_new_input_files_are_the_only_new_work(tmp_path, tiny_model):
    """The nightly case: a finished job's input folder gets a new file; only its rows are generated."""
    write_prompt_files(str(tmp_path / "prompts"), n_files=2, rows_per_file=8, row_group_size=4)
    first = run_in_process(_spec(tmp_path, tiny_model))
    assert first.complete and first.shards_run == 4
    out = tmp_path / "out"
    # The shards' files (images, metadata, commit records); the job record and report are per run.
    before = {
        path: path.stat().st_mtime_ns for path in out.rglob("*") if path.is_file() and path.parent != out
    }

    pq.write_table(prompt_table(8, start=100), tmp_path / "prompts" / "part-new.parquet", row_group_size=4)
    second = run_in_process(_spec(tmp_path, tiny_model))

    assert second.complete and second.shards_run == 2 and second.rows_total == 24
    ids = {f"row-{i:05d}" for i in [*range(16), *range(100, 108)]}
    check_output(str(tmp_path / "out"), ids, 32, 32)
    assert {path: path.stat().st_mtime_ns for path in before} == before, "old shards were rewritten"
