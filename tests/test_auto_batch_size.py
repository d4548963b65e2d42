"""`workers.batch_size: auto`: resolved once per job by the first actor, recorded, and kept on resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import write_prompt_files

import imagemill
from imagemill.core.errors import ImagemillError
from imagemill.testing.in_process import output_hashes, run_in_process
from imagemill.workers.batch_fit import CPU_BATCH_SIZE, MAX_AUTO_BATCH, largest_fitting_batch
from imagemill.workers.generators.contract import BatchKey

KEY = BatchKey(64, 64, 2, 3.0)


def _spec(tmp_path: Path, model: str, output: str, batch_size: int | str, **sections) -> imagemill.JobSpec:
    return imagemill.build_spec(
        {
            "input": {"path": str(tmp_path / "prompts"), "rows_per_shard": 12},
            "output": {"path": str(tmp_path / output)},
            "model": {"source": model},
            "generation": {"width": 32, "height": 32, "num_inference_steps": 2},
            "workers": {"batch_size": batch_size},
            **sections,
        }
    )


def _recorded(output: Path) -> dict:
    return json.loads((output / "_job.json").read_text())


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    write_prompt_files(str(tmp_path / "prompts"), n_files=2, rows_per_file=12, row_group_size=12)
    return tmp_path / "prompts"


def test_auto_resolves_on_the_cpu_to_its_rule_and_the_number_is_recorded(tmp_path, prompts, tiny_model):
    assert run_in_process(_spec(tmp_path, tiny_model, "auto", "auto")).ok == 24
    record = _recorded(tmp_path / "auto")
    recorded = record["fingerprint"]["workers"]["batch_size"]
    assert recorded == CPU_BATCH_SIZE, "the number, not auto: resumes compare it"
    assert record["spec"]["workers"]["batch_size"] == "auto", "the spec as the user wrote it"
    run_in_process(_spec(tmp_path, tiny_model, "numbered", CPU_BATCH_SIZE))
    assert output_hashes(tmp_path / "auto") == output_hashes(tmp_path / "numbered")


def test_a_resume_with_auto_takes_the_recorded_size_and_writes_the_same_bytes(tmp_path, prompts, tiny_model):
    """The recorded size (4 here, not the CPU rule's 8) is what the resumed shard is drawn with."""
    out = tmp_path / "out"
    run_in_process(_spec(tmp_path, tiny_model, "out", 4))
    unbroken = output_hashes(out)
    shard = sorted(path.stem for path in (out / "shards").glob("*.json"))[0]
    for path in (out / "shards" / f"{shard}.json", out / "metadata" / f"{shard}.parquet"):
        path.unlink()  # the shard is no longer committed: as if the first run had been killed
    shutil.rmtree(out / "images" / shard)

    resumed = run_in_process(_spec(tmp_path, tiny_model, "out", "auto"))
    assert (resumed.shards_run, resumed.shards_done) == (1, 2)
    assert output_hashes(out) == unbroken
    assert _recorded(out)["fingerprint"]["workers"]["batch_size"] == 4

    with pytest.raises(ImagemillError, match=r"other settings \(workers\.batch_size changed\)"):
        run_in_process(_spec(tmp_path, tiny_model, "out", 8))


class _MemoryBound:
    """A generator whose device holds at most `limit` images per batch, as a CUDA OOM says it."""

    stage_timer = None

    def __init__(self, limit: int):
        self.limit = limit
        self.sizes: list[int] = []

    def truncated(self, prompts: list[str]) -> list[bool]:
        return [False] * len(prompts)

    def generate(self, prompts, negative_prompts, seeds, key: BatchKey) -> torch.Tensor:
        self.sizes.append(len(prompts))
        if len(prompts) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return torch.zeros(len(prompts), key.height, key.width, 3, dtype=torch.uint8)


def test_the_probe_keeps_the_largest_power_of_two_before_the_first_out_of_memory():
    generator = _MemoryBound(limit=40)
    assert largest_fitting_batch(generator, KEY) == 32
    assert generator.sizes == [1, 2, 4, 8, 16, 32, 64], "stops at the first batch that does not fit"
    assert largest_fitting_batch(_MemoryBound(limit=10_000), KEY) == MAX_AUTO_BATCH


def test_no_batch_that_fits_is_one_line_naming_the_setting():
    with pytest.raises(ImagemillError, match=r"workers.batch_size: auto .* not even one 64x64 image"):
        largest_fitting_batch(_MemoryBound(limit=0), KEY)


def test_auto_with_a_compiled_denoiser_is_refused(tmp_path):
    with pytest.raises(ImagemillError, match="batch_size: auto cannot go with speed.compile"):
        _spec(tmp_path, "some/model", "out", "auto", speed={"compile": True})


def test_the_first_actor_through_ray_fixes_the_size_for_the_job(ray_session, tmp_path, prompts):
    spec = imagemill.build_spec(
        {
            "input": {"path": str(prompts), "rows_per_shard": 12},
            "output": {"path": str(tmp_path / "out")},
            "model": {"kind": "noop"},
            "generation": {"width": 16, "height": 8},
            "workers": {"num_workers": 2, "batch_size": "auto"},
        }
    )
    assert imagemill.run(spec, progress=False).ok == 24
    assert _recorded(tmp_path / "out")["fingerprint"]["workers"]["batch_size"] == CPU_BATCH_SIZE
    assert imagemill.run(spec, progress=False).shards_run == 0, "the re-run matches and has nothing to do"


@pytest.mark.parametrize("value", [0, -1, True, "8", "automatic", 2.0])
def test_a_batch_size_that_is_neither_a_count_nor_auto_is_refused_in_one_line(tmp_path, value):
    with pytest.raises(ImagemillError, match=r"workers.batch_size: .*a whole number above 0, or auto"):
        _spec(tmp_path, "some/model", "out", value)
