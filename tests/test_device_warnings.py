"""A setting known to be slow or unsupported on the device an actor got is one warning line at start,
on the driver's console, naming the setting and the fix (issue #24 item 8): `dtype: float16` on CPU
ran 2.5x slower than float32, silently."""

from __future__ import annotations

import pytest
from conftest import run_cli, write_prompt_files
from hypothesis import given
from hypothesis import strategies as st

from imagemill.core.encode_rates import gpu_images_per_second, images_per_core_second
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


def _encoding_spec(image_format: str, side: int, steps: int, cpus: float, emulated: float | None) -> JobSpec:
    model = (
        {"kind": "emulated", "emulation": {"images_per_second": emulated}} if emulated else {"source": "/m"}
    )
    return JobSpec.model_validate(
        {
            "input": {"path": "/in"},
            "output": {"path": "/out", "image_format": image_format},
            "model": model,
            "generation": {"width": side, "height": side, "num_inference_steps": steps},
            "workers": {"num_cpus_per_worker": cpus},
        }
    )


def _cores_line(lines: list[str]) -> list[str]:
    return [line for line in lines if "cores to encode" in line]


@given(
    image_format=st.sampled_from(["png", "webp"]),  # JPEG on CUDA: nvJPEG's rule
    side=st.sampled_from([256, 512, 768, 1024, 2048]),
    steps=st.integers(1, 50),
    cpus=st.sampled_from([0.5, 1, 2, 4, 8]),
    emulated=st.one_of(st.none(), st.floats(0.5, 120)),
    device=st.sampled_from(["cpu", "cuda"]),
)
def test_a_device_faster_than_the_actors_cores_encode_is_one_line_whose_fix_silences_it(
    image_format, side, steps, cpus, emulated, device
):
    """Where the device (an emulated one's rate, or the slowest a GPU makes at the size and steps)
    makes images faster than the actor's reserved cores encode them, one line names
    output.image_format and the cores needed; setting num_cpus_per_worker to that number silences it.
    A real model on a CPU never warns: the CPU is the device."""
    spec = _encoding_spec(image_format, side, steps, cpus, emulated)
    if emulated is None and device == "cpu":
        assert _cores_line(device_warnings(spec, device)) == []
        return
    rate = emulated or gpu_images_per_second(side, side, steps)
    per_core = images_per_core_second(image_format, side, side)
    lines = _cores_line(device_warnings(spec, device))
    assert len(lines) == (rate > cpus * per_core), (rate, cpus * per_core, lines)
    if lines:
        assert lines[0].startswith("output.image_format: ") and "\n" not in lines[0]
        needed = int(lines[0].split("num_cpus_per_worker to ")[1].split(" ")[0])
        assert needed * per_core >= rate > (needed - 1) * per_core
        assert (
            _cores_line(device_warnings(_encoding_spec(image_format, side, steps, needed, emulated), device))
            == []
        )
        assert _cores_line(
            device_warnings(_encoding_spec("jpeg", side, steps, cpus, emulated), "cpu")
        ) == [] or (rate > cpus * images_per_core_second("jpeg", side, side))


def test_the_emulated_30_per_second_png_of_the_busy_table_warns_for_5_cores():
    """BENCHMARKS.md's device-busy table: 512² PNG at 30 images/s kept the device 0.59 busy on 2 cores and
    needs 5; the start-up line says so."""
    (line,) = _cores_line(device_warnings(_encoding_spec("png", 512, 20, 2, 30.0), "cpu"))
    assert "needs 5 cores" in line and "the actor has 2" in line
