"""`input.rows_per_shard: auto` (the default): small inputs are cut so every worker has work, batches
stay full where the rows allow, and a resumed output keeps the cut it began with."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import OBJECT_STORE_BYTES, isolated_cluster, write_prompt_files
from hypothesis import example, given, settings
from hypothesis import strategies as st

import imagemill
from imagemill.core.layout import OutputLayout
from imagemill.core.records import committed_shards
from imagemill.planning.auto_cut import MAX_ROWS, auto_rows_per_shard
from imagemill.planning.shards import plan_shards
from imagemill.testing.in_process import InThisProcess, run_in_process


def _spec(tmp_path: Path, **workers) -> imagemill.JobSpec:
    return imagemill.build_spec(
        {
            "name": "cut",
            "input": {"path": str(tmp_path / "prompts")},
            "output": {"path": str(tmp_path / "out")},
            "model": {"kind": "noop"},
            "generation": {"width": 16, "height": 16},
            "workers": workers,
        }
    )


def _write_groups(folder: Path, files: list[list[int]]) -> int:
    """Parquet files with these row-group sizes; returns the row count."""
    row = 0
    for index, groups in enumerate(files):
        with pq.ParquetWriter(folder / f"part-{index}.parquet", pa.schema({"prompt": pa.string()})) as writer:
            for size in groups:
                writer.write_table(pa.table({"prompt": [f"p{row + i}" for i in range(size)]}))
                row += size
    return row


@settings(max_examples=60, deadline=None)
@example(files=[[29, 31, 31]], workers=13, batch=7)  # remainders merged: 12 shards at the auto cut
@given(
    files=st.lists(st.lists(st.integers(1, 400), min_size=1, max_size=4), min_size=1, max_size=3),
    workers=st.integers(1, 16),
    batch=st.one_of(st.integers(1, 64), st.just("auto")),
)
def test_every_worker_gets_a_shard_and_batches_stay_full_where_rows_allow(files, workers, batch):
    """Whatever the row groups: at least one shard per worker when there are as many rows, never
    more rows per shard than MAX_ROWS asks, and, where the auto cut itself gives every worker a shard,
    with a batch of rows per worker, no shard but a file's last (or a row group's last piece) under a
    batch (the cut is in whole batches). Where the layout would not (29, 31 and 31 rows cut by 7 for 13
    workers made 12 shards, remainders merged: hypothesis found it), the cut is lowered until it does."""
    with tempfile.TemporaryDirectory() as folder:
        rows = _write_groups(Path(folder), files)
        spec = imagemill.build_spec(
            {"input": {"path": folder}, "output": {"path": f"{folder}/out"}, "model": {"kind": "noop"},
             "workers": {"batch_size": batch}}
        )  # fmt: skip
        auto = partial(auto_rows_per_shard, workers=workers, batch_size=batch)
        plan = plan_shards(spec.input, auto, lambda: workers)
    cut = plan.rows_per_shard
    assert 1 <= cut <= auto_rows_per_shard(rows, workers, batch) <= MAX_ROWS
    assert plan.total_rows == rows
    assert len(plan.shards) >= min(workers, rows), (cut, [s.num_rows for s in plan.shards])
    if cut < auto_rows_per_shard(rows, workers, batch):
        return  # lowered for the layout: batches may be cut short
    full = batch if isinstance(batch, int) else 8
    if rows >= workers * full:
        assert cut >= full and (cut % full == 0 or cut == MAX_ROWS)
        # Under a batch only where the planner must end a shard early: a file's last shard, a row
        # group's last piece, and the row groups gathered before one that is cut into pieces.
        shards = plan.shards
        for shard, after in zip(shards, [*shards[1:], None], strict=True):
            ends_early = after is None or after.file_url != shard.file_url or after.row_offset is not None
            last_piece = shard.row_offset is not None and (
                ends_early or after.row_group_start != shard.row_group_start
            )
            assert shard.num_rows >= full or ends_early or last_piece, (cut, [s.num_rows for s in shards])


def test_an_explicit_number_is_kept_and_anything_else_refused_in_one_line(tmp_path):
    write_prompt_files(str(tmp_path / "prompts"), n_files=1, rows_per_file=16, row_group_size=16)
    spec = imagemill.build_spec(
        {**_spec(tmp_path).model_dump(), "input": {"path": str(tmp_path / "prompts"), "rows_per_shard": 5}}
    )
    assert spec.input.rows_per_shard == 5 and plan_shards(spec.input).rows_per_shard == 5
    for bad in ("0", 0, -3, 2.5, True, "many"):
        with pytest.raises(
            imagemill.ImagemillError, match=r"input.rows_per_shard: .*must be a whole number above 0, or auto"
        ):
            imagemill.build_spec(
                {
                    "input": {"path": "x", "rows_per_shard": bad},
                    "output": {"path": "o"},
                    "model": {"kind": "noop"},
                }
            )


class _FourWorkers(InThisProcess):
    """The in-process executor, telling the planner it has four workers (as a 4-GPU pool would)."""

    def workers(self, spec: imagemill.JobSpec) -> int:
        return 4


def test_a_resume_keeps_the_recorded_cut_whatever_the_worker_count_now(tmp_path):
    write_prompt_files(str(tmp_path / "prompts"), n_files=1, rows_per_file=64, row_group_size=4)
    spec = _spec(tmp_path, batch_size=4)
    first = imagemill.run(spec, progress=False, executor=_FourWorkers())
    assert first.complete and first.shards_total == 16  # 64 rows ÷ (4 per worker × 4 workers): 4 rows
    record = json.loads((tmp_path / "out" / "_job.json").read_text())
    assert record["fingerprint"]["input"]["rows_per_shard"] == 4
    output = OutputLayout(str(tmp_path / "out"))
    made = sorted(committed_shards(output))
    gone = made[5]
    (tmp_path / "out" / OutputLayout.stats_path(gone)).unlink()  # a shard lost: the re-run must redo it

    again = run_in_process(spec)  # one worker now: a fresh cut would be 16 rows a shard
    assert again.complete and again.shards_total == 16 and again.shards_run == 1
    assert sorted(committed_shards(output)) == made

    fresh = run_in_process(spec, overwrite=True)  # --overwrite starts again: a new cut, for one worker
    assert fresh.complete and fresh.shards_total == 4


@pytest.mark.ray
def test_a_16_row_job_on_two_workers_has_both_commit_shards(ray_session, tmp_path):
    write_prompt_files(str(tmp_path / "prompts"), n_files=1, rows_per_file=16, row_group_size=16)
    result = imagemill.run(_spec(tmp_path, num_workers=2), progress=False)
    assert result.complete and result.shards_total == 2, result.summary()
    stats = committed_shards(OutputLayout(str(tmp_path / "out")))
    workers = {shard.worker for shard in stats.values()}
    assert len(workers) == 2 and all(name.startswith("imagemill:cut:") for name in workers), workers


@pytest.mark.cluster
def test_a_1000_row_job_on_eight_gpus_hands_every_actor_work(tmp_path):
    """The placement tests' kind of cluster (ray.cluster_utils), with one node of 8 logical GPUs:
    `imagemill run` with num_workers unset starts one actor per GPU, and each commits shards."""
    write_prompt_files(str(tmp_path / "prompts"), n_files=1, rows_per_file=1000, row_group_size=1000)
    job = tmp_path / "job.yaml"
    job.write_text(
        f"input: {{path: {tmp_path / 'prompts'}}}\noutput: {{path: {tmp_path / 'out'}}}\n"
        "model: {kind: noop}\ngeneration: {width: 8, height: 8}\n"
    )
    with pytest.MonkeyPatch.context() as monkeypatch, isolated_cluster(monkeypatch) as cluster:
        cluster.add_node(num_cpus=8, num_gpus=8, object_store_memory=OBJECT_STORE_BYTES)
        cluster.wait_for_nodes()
        done = subprocess.run(
            [sys.executable, "-m", "imagemill.cli", "run", str(job), "--no-progress"],
            capture_output=True,
            text=True,
            env={**os.environ, "RAY_ADDRESS": cluster.address},
            timeout=900,
        )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1000 rows: 1000 ok, 0 error in 31/31 shards" in done.stdout, done.stdout  # 32 rows a shard
    stats = committed_shards(OutputLayout(str(tmp_path / "out")))
    workers = {shard.worker for shard in stats.values()}
    assert len(workers) == 8, sorted(workers)
    assert {shard.device for shard in stats.values()} == {"cpu"}  # logical GPUs: torch finds none
