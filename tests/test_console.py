"""What a user sees from `imagemill run`: one-line errors with exit 2, a log without a progress
bar's carriage returns, a periodic progress line, and a re-run that says it had nothing to do."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest
from conftest import check_output, make_bucket, write_prompt_files

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (INFO|WARNING) imagemill\.[\w.]+: ")


def _imagemill(*args: str, env: dict[str, str], stderr=subprocess.PIPE) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "imagemill.cli", *args],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env=env,
        timeout=600,
    )


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_prompts(s3_endpoint) -> str:
    bucket = make_bucket("console-prompts")
    write_prompt_files(f"{bucket}/prompts", n_files=1, rows_per_file=4, row_group_size=4)
    return f"{bucket}/prompts"


def _without_aws(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("AWS_")}, **extra}


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("no-credentials", "imagemill: error: storage credentials: The config profile (nope) could not be"),
        ("unreachable", "imagemill: error: cannot reach the storage endpoint; check AWS_ENDPOINT_URL"),
        ("no-bucket", "imagemill: error: input path does not exist: s3://no-such-bucket/prompts"),
        ("offline-hub-model", "imagemill: error: model 'some-org/some-model' (model.source) is a hub id"),
        ("output-is-a-file", "imagemill: error: "),
    ],
)
def test_user_errors_are_one_line_and_exit_2(s3_endpoint, s3_prompts, tmp_path, case, expected):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    settings = {"input": s3_prompts, "output": str(tmp_path / "out"), "model": "{kind: noop}"}
    if case == "no-credentials":
        env = _without_aws(AWS_PROFILE="nope", AWS_ENDPOINT_URL=s3_endpoint)
    elif case == "unreachable":
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{_closed_port()}"
    elif case == "no-bucket":
        settings["input"] = "s3://no-such-bucket/prompts"
    elif case == "offline-hub-model":
        settings["model"] = "{source: some-org/some-model}"
    else:
        (tmp_path / "a-file").write_text("not a folder")
        settings["output"] = str(tmp_path / "a-file")
        expected += f"{tmp_path / 'a-file'} is a file where a folder must be; output.path must name a folder"
    job = tmp_path / "job.yaml"
    job.write_text(
        f"input: {{path: {settings['input']}}}\noutput: {{path: {settings['output']}}}\n"
        f"model: {settings['model']}\n"
    )
    done = _imagemill("run", str(job), env=env)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_a_logged_run_has_progress_lines_and_a_rerun_says_nothing_to_do(ray_address, tmp_path):
    rows = write_prompt_files(str(tmp_path / "prompts"), n_files=2, rows_per_file=20, row_group_size=10)
    job = tmp_path / "job.yaml"
    job.write_text(
        f"input: {{path: {tmp_path / 'prompts'}, rows_per_shard: 10}}\n"
        f"output: {{path: {tmp_path / 'out'}}}\n"
        "model: {kind: noop}\n"
        "generation: {width: 16, height: 16}\n"
        "workers: {num_workers: 1, batch_size: 5}\n"
    )
    env = {**os.environ, "RAY_ADDRESS": ray_address}
    log_path = tmp_path / "run.log"
    with open(log_path, "w") as log:  # stderr to a file, as `2> log` and `kubectl logs` have it
        done = _imagemill("run", str(job), env=env, stderr=log)
    text = log_path.read_text()
    assert done.returncode == 0, text
    assert b"\r" not in log_path.read_bytes(), "a progress bar drew into the log"  # read_text makes \r \n
    assert re.search(rf"progress: {rows}/{rows} images \(100%\), 4/4 shards, [\d.]+ images/s", text), text
    noise = [line for line in text.splitlines() if not LOG_LINE.match(line)]
    assert not noise, f"lines that are not imagemill's own: {noise}"
    check_output(str(tmp_path / "out"), {f"row-{i:05d}" for i in range(rows)}, 16, 16)

    again = _imagemill("run", str(job), env=env)
    assert again.returncode == 0, again.stderr
    assert "in 4/4 shards (0 run now), nothing to do: all 4 shards were already done" in again.stdout
    assert "images/s" not in again.stdout
