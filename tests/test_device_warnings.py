"""A setting known to be slow or unsupported on the device an actor got is one warning line at start,
on the driver's console, naming the setting and the fix (issue #24 item 8): `dtype: float16` on CPU
ran 2.5x slower than float32, silently."""

from __future__ import annotations

import pytest
from conftest import run_cli, write_prompt_files
from hypothesis import given
from hypothesis import strategies as st

from imagemill.core.spec import JobSpec
from imagemill.workers.device_warnings import device_warnings


def _spec(dtype: str, compile: bool) -> JobSpec:
    return JobSpec.model_validate(
        {
            "input": {"path": "/in"},
            "output": {"path": "/out"},
            "model": {"source": "/m", "dtype": dtype},
            "speed": {"compile": compile},
        }
    )


@given(
    dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
    device=st.sampled_from(["cpu", "cuda", "cuda:1"]),
    compile=st.booleans(),
)
def test_each_slow_setting_is_one_line_naming_it_on_the_device_it_is_slow_on(dtype, device, compile):
    lines = device_warnings(_spec(dtype, compile), device)
    expected = []
    if device == "cpu" and dtype == "float16":
        expected.append("model.dtype")
    if device == "cpu" and compile:
        expected.append("speed.compile")
    assert [line.split(":", 1)[0] for line in lines] == expected
    assert all("float32" in line or "compile: false" in line for line in lines)


@pytest.mark.cli
def test_a_cpu_job_in_float16_prints_one_warning_line_naming_model_dtype(ray_address, tiny_model, tmp_path):
    write_prompt_files(str(tmp_path / "prompts"), n_files=1, rows_per_file=4, row_group_size=2)
    job = tmp_path / "job.yaml"
    job.write_text(
        f"input: {{path: {tmp_path / 'prompts'}, rows_per_shard: 2}}\n"
        f"output: {{path: {tmp_path / 'out'}}}\n"
        f"model: {{source: {tiny_model}, device: cpu, dtype: float16}}\n"
        "generation: {width: 32, height: 32, num_inference_steps: 2}\n"
        "workers: {num_workers: 2, batch_size: 2}\n"
    )
    done = run_cli("run", str(job), "--no-progress", ray_address=ray_address)
    assert done.returncode == 0, done.stderr
    warned = [line for line in done.stderr.splitlines() if "model.dtype" in line]
    assert len(warned) == 1, done.stderr  # two actors on CPU, one line
    assert " WARNING " in warned[0] and "float32" in warned[0]
