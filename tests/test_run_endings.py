"""How a run ended, told by its job record, its report and `imagemill status`: a run stopped by SIGTERM
(what `ray job stop` and a deleted pod send) or Ctrl-C says "interrupted", with when, and exits 143 or
130; running the same command again resumes the job, and once more finishes it.

The stopped runs end slowly on purpose (their closing record and report take 4 s, as on a slow
store): Ray's native SIGTERM handler arms a 3 s abort, which used to kill such a run with SIGABRT."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import run_cli, write_prompt_files

import imagemill
from imagemill.reporting.outcome import INTERRUPTED
from imagemill.reporting.status import STATUS_EXIT_CODES
from imagemill.testing.in_process import run_in_process

JOB = """\
name: endings
input: {{path: {input}, rows_per_shard: 4}}
output: {{path: {output}}}
model: {{source: {model}}}
generation: {{width: 32, height: 32, num_inference_steps: 4, guidance_scale: 3.0}}
workers: {{num_workers: 1, batch_size: 4}}
"""

# `imagemill ARGS` whose job record and report are written 4 s late; Ctrl-C reaches it as from a
# terminal even where the suite runs in the background (which starts children with SIGINT ignored).
SLOW_END = """\
import runpy, signal, sys, time
import imagemill.execution.runner

signal.signal(signal.SIGINT, signal.default_int_handler)

end_record = imagemill.execution.runner._end_record


def slow_end_record(*args, **kwargs):
    time.sleep(4)
    return end_record(*args, **kwargs)


imagemill.execution.runner._end_record = slow_end_record
sys.argv = ["imagemill", *sys.argv[1:]]
runpy.run_module("imagemill.cli", run_name="__main__")
"""


def _commits(out: Path) -> int:
    return len(list((out / "shards").glob("*.json")))


def _stop_after_a_commit(job: Path, out: Path, ray_address: str, stop: signal.Signals) -> str:
    """Start the job, send `stop` once it has committed a shard more than before; its stderr."""
    before = _commits(out)
    run = subprocess.Popen(
        [sys.executable, "-c", SLOW_END, "run", str(job), "--no-progress"],
        env={**os.environ, "RAY_ADDRESS": ray_address},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while _commits(out) <= before:
        assert run.poll() is None and time.time() < deadline, "the run ended or stalled before a commit"
        time.sleep(0.2)
    run.send_signal(stop)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 128 + stop, stderr
    assert "interrupted; run the same command again to resume" in stderr
    # No stack dump from Ray's failure signal handler before the clean exit (issue #24 item 9).
    assert "SIGTERM received" not in stderr and "PC: @" not in stderr, stderr
    return stderr


def test_a_stopped_run_says_it_was_interrupted_and_reruns_resume_then_finish(
    ray_address, tmp_path, tiny_model
):
    prompts, out = tmp_path / "prompts", tmp_path / "out"
    rows = write_prompt_files(str(prompts), n_files=2, rows_per_file=48, row_group_size=4)
    shards = rows // 4
    job = tmp_path / "job.yaml"
    job.write_text(JOB.format(input=prompts, output=out, model=tiny_model))

    done_by_run = []
    for stop in (signal.SIGTERM, signal.SIGINT):
        _stop_after_a_commit(job, out, ray_address, stop)
        record = json.loads((out / "_job.json").read_text())
        assert record["status"] == "interrupted" and record["ended_at"], (stop, record)
        done_by_run.append(record["shards_done"])
        # Shards in flight when it stopped may still commit before its actors go.
        assert 1 <= record["shards_done"] <= _commits(out) < shards, f"{stop!r}: stopped part-way"
        report = json.loads((out / "report.json").read_text())
        assert report["status"] == "interrupted"
        assert "interrupted" in (out / "report.html").read_text()
        assert not (out / "_SUCCESS").exists()
        status = run_cli("status", str(out))
        assert ": interrupted" in status.stdout.splitlines()[0], status.stdout
        assert status.returncode == STATUS_EXIT_CODES[INTERRUPTED] == 6
    assert done_by_run[0] < done_by_run[1], f"the second run resumed, adding shards: {done_by_run}"

    # The last run, which finishes the job: the real driver with its shards in process.
    again = run_in_process(imagemill.load_spec(job))
    assert again.complete and 0 < again.shards_run <= shards - done_by_run[1], again.summary()
    assert json.loads((out / "_job.json").read_text())["status"] == "complete"
    assert _commits(out) == shards
