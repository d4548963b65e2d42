"""Input files that change between runs of a job: a rewritten file is refused (or redone on request),
a removed one stops counting, a new one is new work (issue #13 point 5).

Each job's first run, which only sets the scene, runs in process (testing.in_process: the real driver and
worker without actors); the runs whose exit code and lines are checked go through the CLI and Ray."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
from conftest import read_metadata, run_cli

import imagemill
from imagemill.testing.in_process import run_in_process


def _write(path, ids: list[str]) -> None:
    pq.write_table(pa.table({"id": ids, "prompt": [f"a photo of {i}" for i in ids]}), path)


def _job(tmp_path) -> str:
    (tmp_path / "prompts").mkdir()
    job = tmp_path / "job.yaml"
    job.write_text(
        f"input: {{path: {tmp_path / 'prompts'}, rows_per_shard: 4}}\noutput: {{path: {tmp_path / 'out'}}}\n"
        "model: {kind: noop}\ngeneration: {width: 16, height: 16}\nworkers: {num_workers: 1}\n"
    )
    return str(job)


def _first_run(job: str) -> None:
    assert run_in_process(imagemill.load_spec(job)).complete


def test_a_removed_input_file_is_reported_and_no_longer_counted(ray_address, tmp_path):
    job = _job(tmp_path)
    _write(tmp_path / "prompts" / "a.parquet", ["a1", "a2", "a3", "a4"])
    _write(tmp_path / "prompts" / "b.parquet", ["b1", "b2", "b3", "b4"])
    _first_run(job)

    (tmp_path / "prompts" / "b.parquet").unlink()
    again = run_cli("run", job, "--no-progress", ray_address=ray_address)

    assert again.returncode == 0, again.stderr
    gone = (tmp_path / "prompts" / "b.parquet").as_uri()
    [warning] = [line for line in again.stderr.splitlines() if "is gone" in line]
    assert gone in warning and "WARNING" in warning
    assert "4 rows: 4 ok, 0 error in 1/1 shards (0 run now)" in again.stdout
    status = run_cli("status", str(tmp_path / "out"))
    assert status.returncode == 0, status.stdout
    assert "shards: 1/1 done" in status.stdout and "rows:   4/4 done: 4 ok, 0 error" in status.stdout
    assert (tmp_path / "out" / "_SUCCESS").exists()


def test_a_rewritten_input_file_is_refused_and_redone_on_request(ray_address, tmp_path):
    job = _job(tmp_path)
    _write(tmp_path / "prompts" / "a.parquet", ["a1", "a2", "a3", "a4"])
    _write(tmp_path / "prompts" / "b.parquet", ["b1", "b2", "b3", "b4"])
    _first_run(job)
    kept = (tmp_path / "out" / "shards" / "a-rg00000-00001.json").stat().st_mtime_ns

    _write(tmp_path / "prompts" / "b.parquet", ["new1", "new2", "new3", "new4"])  # same name and size
    refused = run_cli("run", job, "--no-progress", ray_address=ray_address)

    assert refused.returncode == 2, refused.stdout + refused.stderr
    [line] = refused.stderr.strip().splitlines()
    assert line.startswith("imagemill: error: input file ") and "--redo-changed" in line
    assert (tmp_path / "prompts" / "b.parquet").as_uri() in line

    redone = run_cli("run", job, "--no-progress", "--redo-changed", ray_address=ray_address)
    assert redone.returncode == 0, redone.stderr
    assert "8 rows: 8 ok, 0 error in 2/2 shards (1 run now)" in redone.stdout
    ids = set(read_metadata(str(tmp_path / "out")).column("id").to_pylist())
    assert ids == {"a1", "a2", "a3", "a4", "new1", "new2", "new3", "new4"}
    assert (tmp_path / "out" / "shards" / "a-rg00000-00001.json").stat().st_mtime_ns == kept
    footers = json.loads((tmp_path / "out" / "_job.json").read_text())["input_footers"]
    assert set(footers) == {(tmp_path / "prompts" / name).as_uri() for name in ("a.parquet", "b.parquet")}

    # The same command once more: nothing changed, nothing to do.
    assert "(0 run now)" in run_in_process(imagemill.load_spec(job)).summary()
