"""How a run ended, told by its job record, its report and `imagemill status`: a run stopped by SIGTERM
(what `ray job stop` and a deleted pod send) or Ctrl-C says "interrupted", with when, and exits 143 or
130;
running the same command again finishes the job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cli, write_prompt_files

JOB = """\
name: endings
input: {{path: {input}, rows_per_shard: 4}}
output: {{path: {output}}}
model: {{source: {model}}}
generation: {{width: 32, height: 32, num_inference_steps: 4, guidance_scale: 3.0}}
workers: {{num_workers: 1, batch_size: 4}}
"""


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stopped_run_says_it_was_interrupted_and_a_rerun_finishes(ray_address, tmp_path, tiny_model, stop):
    prompts, out = tmp_path / "prompts", tmp_path / "out"
    rows = write_prompt_files(str(prompts), n_files=2, rows_per_file=32, row_group_size=4)
    job = tmp_path / "job.yaml"
    job.write_text(JOB.format(input=prompts, output=out, model=tiny_model))
    run = subprocess.Popen(
        [sys.executable, "-m", "imagemill.cli", "run", str(job), "--no-progress"],
        env={**os.environ, "RAY_ADDRESS": ray_address},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while not list((out / "shards").glob("*.json")):
        assert run.poll() is None and time.time() < deadline, "the run ended or stalled before a commit"
        time.sleep(0.2)
    run.send_signal(stop)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 128 + stop, stderr
    assert "interrupted; run the same command again to resume" in stderr

    record = json.loads((out / "_job.json").read_text())
    assert record["status"] == "interrupted" and record["ended_at"]
    assert 1 <= record["shards_done"] < rows // 4, "stopped part-way"
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "interrupted"
    assert "interrupted" in (out / "report.html").read_text()
    assert not (out / "_SUCCESS").exists()
    status = run_cli("status", str(out))
    assert ": interrupted" in status.stdout.splitlines()[0], status.stdout

    again = run_cli("run", str(job), "--no-progress", ray_address=ray_address)
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "_job.json").read_text())["status"] == "complete"
    assert len(list(Path(out, "shards").glob("*.json"))) == rows // 4
