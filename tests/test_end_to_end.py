"""End to end through Ray and real storage: the S3 endpoint, the local disk, the CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import check_output, make_bucket, prompt_table, read_metadata, run_cli, write_prompt_files
from PIL import Image

import imagemill
from imagemill.testing.in_process import run_in_process

SMALL = {"width": 64, "height": 64, "num_inference_steps": 2, "guidance_scale": 5.0}


def test_s3_input_model_and_output_with_two_actors(ray_session, s3_endpoint, tiny_model):
    """Input, model and output all on the S3 endpoint; several files of several row groups, 2 actors."""
    bucket = make_bucket("e2e")
    rows = write_prompt_files(f"{bucket}/prompts", n_files=3, rows_per_file=30, row_group_size=10)
    fs = fsspec.filesystem("s3")
    fs.put(tiny_model, "e2e/models/tiny-sd", recursive=True)
    secret = "imagemill-test-secret-do-not-log"
    spec = imagemill.build_spec(
        {
            "name": "e2e-s3",
            "input": {"path": f"{bucket}/prompts", "rows_per_shard": 20},
            "output": {"path": f"{bucket}/out"},
            "model": {
                "source": f"{bucket}/models/tiny-sd",
                # explicit options for the model, the environment for input and output
                "storage_options": {"endpoint_url": s3_endpoint, "key": "testing", "secret": secret},
            },
            "generation": SMALL,
            "workers": {"num_workers": 2, "batch_size": 4},
        }
    )
    result = imagemill.run(spec, progress=False)

    assert result.complete and result.shards_total == 6
    assert (result.rows_total, result.ok, result.errors) == (rows, rows, 0)
    check_output(f"{bucket}/out", {f"row-{i:05d}" for i in range(rows)}, 64, 64)
    record_text = fs.cat_file("e2e/out/_job.json").decode()
    assert secret not in record_text
    record = json.loads(record_text)
    assert record["status"] == "complete" and record["rows_ok"] == rows
    assert record["spec"]["model"]["storage_options"] == "<redacted>"
    assert {"torch", "diffusers", "ray", "python"} <= set(record["versions"])


def _local_job(
    tmp_path, tiny_model, input_dir, name: str, batch_size: int, workers: int, rows_per_shard: int
):
    return imagemill.build_spec(
        {
            "name": name,
            "input": {"path": str(input_dir), "rows_per_shard": rows_per_shard},
            "output": {"path": str(tmp_path / name)},
            "model": {"source": tiny_model},
            "generation": {**SMALL, "seed": 7},
            "workers": {"num_workers": workers, "batch_size": batch_size},
        }
    )


def test_images_do_not_depend_on_actor_count_or_shard_order(ray_session, tmp_path, tiny_model):
    input_dir = tmp_path / "prompts"
    input_dir.mkdir()
    table = prompt_table(14)
    # Per-row overrides: a row seed, another size (batched apart), a negative prompt.
    table = table.append_column("seed", pa.array([None] * 13 + [12345], pa.int64()))
    table = table.append_column("width", pa.array([None, 48] * 7, pa.int64()))
    table = table.append_column("negative_prompt", pa.array(["blurry", None] * 7))
    pq.write_table(table, input_dir / "a.parquet", row_group_size=4)
    pq.write_table(prompt_table(6, start=100, with_ids=False), input_dir / "b.parquet", row_group_size=3)

    def hashes(
        name: str, batch_size: int, workers: int, rows_per_shard: int, in_process: bool = False
    ) -> dict[str, str]:
        spec = _local_job(tmp_path, tiny_model, input_dir, name, batch_size, workers, rows_per_shard)
        if in_process:
            run_in_process(spec)
        else:
            imagemill.run(spec, progress=False)
        rows = read_metadata(spec.output.path).to_pylist()
        assert all(row["status"] == "ok" for row in rows)
        return {row["id"]: row["sha256"] for row in rows}

    # Batches are cut from each shard alone, so one worker taking the shards in order (in this
    # process) and two actors taking them in whatever order they finish run the same batches: the
    # same bytes. A different batch_size or rows_per_shard changes the batches, and with them the last
    # bits of the computation (see "Determinism" in docs/ARCHITECTURE.md); that is not claimed here.
    reference = hashes("one-worker", batch_size=3, workers=1, rows_per_shard=4, in_process=True)
    assert hashes("two-actors", batch_size=3, workers=2, rows_per_shard=4) == reference

    assert len(reference) == 20 and len(set(reference.values())) == 20, "each row must get its own image"
    rows = {row["id"]: row for row in read_metadata(str(tmp_path / "one-worker")).to_pylist()}
    assert rows["row-00013"]["seed"] == 12345
    assert rows["row-00001"]["width"] == 48 and rows["row-00000"]["width"] == 64
    assert rows["row-00000"]["negative_prompt"] == "blurry"
    assert rows["b-00000005"]["input_row"] == 5


def test_cli_runs_a_job_on_local_disk_and_a_rerun_resumes(tmp_path, tiny_model):
    rows = write_prompt_files(str(tmp_path / "prompts"), n_files=2, rows_per_file=12, row_group_size=4)
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(
        "name: cli-job\n"
        "input: {path: prompts, rows_per_shard: 8}\n"
        "output: {path: out}\n"
        "model: {source: placeholder}\n"
        "generation: {width: 32, height: 32, num_inference_steps: 2}\n"
    )
    args = ["run", str(spec_file), "--model", tiny_model, "--batch-size", "4", "--num-workers", "1"]
    args += ["--image-format", "jpeg", "--set", "generation.guidance_scale=3.0", "--no-progress"]
    done = run_cli(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"{rows} rows: {rows} ok, 0 error in 4/4 shards (4 run now)" in done.stdout
    shard_lines = re.findall(r"shard \S+ done: \d+ rows, \d+ ok, 0 error in .* \[\d/4 shards\]", done.stderr)
    assert len(shard_lines) == 4, done.stderr  # one INFO line per shard; no "filtered" when not scoring
    assert "(ShardWorker" not in done.stderr, done.stderr  # the actors print nothing: no bars, no notices
    hashes = check_output(str(tmp_path / "out"), {f"row-{i:05d}" for i in range(rows)}, 32, 32)
    assert all(
        path.endswith(".jpg") for path in read_metadata(str(tmp_path / "out")).column("path").to_pylist()
    )
    assert read_metadata(str(tmp_path / "out")).column("guidance_scale").to_pylist() == [3.0] * rows

    again = run_cli(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "in 4/4 shards (0 run now)" in again.stdout
    assert check_output(str(tmp_path / "out"), set(hashes), 32, 32) == hashes

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["counts"]["rows_ok"] == rows and len(report["samples"]) == 8  # 2 per shard
    assert (tmp_path / "out" / "report.html").read_text().count('src="data:image/jpeg') == 8

    status = run_cli("status", str(tmp_path / "out"))
    assert status.returncode == 0, status.stderr
    assert "shards: 4/4 done" in status.stdout
    assert f"rows:   {rows}/{rows} done: {rows} ok, 0 error" in status.stdout


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing-input", "input path does not exist: "),
        ("missing-column", "prompt column 'text' not found in "),
        ("missing-model", "model path does not exist: "),
    ],
)
def test_cli_reports_user_errors_in_one_line(tmp_path, tiny_model, case, expected):
    write_prompt_files(str(tmp_path / "prompts"), n_files=1, rows_per_file=4, row_group_size=4)
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(
        f"input: {{path: {'nowhere' if case == 'missing-input' else 'prompts'}}}\n"
        f"output: {{path: out}}\n"
        f"model: {{source: {'./no/such/model' if case == 'missing-model' else tiny_model}}}\n"
    )
    extra = ["--set", "input.prompt_column=text"] if case == "missing-column" else []
    done = run_cli("run", str(spec_file), *extra, cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("imagemill: error: " + expected), done.stderr
    if case == "missing-column":
        assert "columns found: id, prompt" in lines[0]
    assert "Traceback" not in done.stderr + done.stdout


def test_noop_generator_runs_the_whole_pipeline_without_a_model(ray_session, tmp_path):
    """model.kind: noop draws a solid colour from each row's seed: the pipeline with no model in it."""
    rows = write_prompt_files(str(tmp_path / "prompts"), n_files=2, rows_per_file=50, row_group_size=25)
    spec = imagemill.build_spec(
        {
            "input": {"path": str(tmp_path / "prompts"), "rows_per_shard": 25},
            "output": {"path": str(tmp_path / "out")},
            "model": {"kind": "noop"},
            "generation": {"width": 16, "height": 8},
            "workers": {"num_workers": 1, "batch_size": 10},
        }
    )
    assert imagemill.run(spec, progress=False).ok == rows
    check_output(str(tmp_path / "out"), {f"row-{i:05d}" for i in range(rows)}, 16, 8)
    row = read_metadata(str(tmp_path / "out")).to_pylist()[0]
    pixels = Image.open(tmp_path / "out" / row["path"]).getcolors()
    assert pixels == [(16 * 8, (row["seed"] >> 16 & 255, row["seed"] >> 8 & 255, row["seed"] & 255))]


def test_the_driver_runs_a_job_without_importing_torch(ray_address, tmp_path):
    """The driver handles shard descriptors and stats: `imagemill run` never imports torch or the model
    libraries (seconds of every start, and a head node needs none). Only the actors do, once they
    run (workers/actors.py); an `evaluation:` post-pass is the one exception."""
    write_prompt_files(str(tmp_path / "prompts"), n_files=1, rows_per_file=8, row_group_size=4)
    job = tmp_path / "job.yaml"
    job.write_text(
        f"input: {{path: {tmp_path / 'prompts'}, rows_per_shard: 4}}\noutput: {{path: {tmp_path / 'out'}}}\n"
        "model: {kind: noop}\ngeneration: {width: 16, height: 16}\nworkers: {num_workers: 1}\n"
    )
    script = (
        "import atexit, runpy, sys\n"
        "heavy = ('torch', 'diffusers', 'transformers')\n"
        "atexit.register(lambda: print('loaded:', *sorted(m for m in sys.modules if m in heavy)))\n"
        f"sys.argv = ['imagemill', 'run', {str(job)!r}, '--no-progress']\n"
        "runpy.run_module('imagemill.cli', run_name='__main__')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "RAY_ADDRESS": ray_address},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "8 rows: 8 ok, 0 error" in done.stdout, done.stdout
    assert done.stdout.splitlines()[-1] == "loaded:", done.stdout
