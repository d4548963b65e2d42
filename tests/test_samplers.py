"""model.scheduler: the diffusers sampler swapped in after loading, checked when the spec is read,
recorded in the metadata and part of the fingerprint. On the tiny model, in-process (no Ray)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import prompt_table, read_metadata

import imagemill
from imagemill.core.errors import ImagemillError
from imagemill.core.job_record import JobRecord, write_job_record
from imagemill.core.layout import OutputLayout
from imagemill.core.write_gate import OwnedOutput
from imagemill.output.claim import claim_output
from imagemill.planning.shards import plan_shards
from imagemill.workers.worker import ShardWorker

STEPS = 4
SCHEDULERS = {
    "default": None,
    "euler_a": {"name": "EulerAncestralDiscreteScheduler"},
    "dpmpp": {
        "name": "DPMSolverMultistepScheduler",
        "config": {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True},
    },
    "lcm": {"name": "LCMScheduler", "config": {"timestep_spacing": "trailing"}},
}


def _spec(tmp_path: Path, model: dict, out: str, steps: int = STEPS) -> imagemill.JobSpec:
    return imagemill.build_spec(
        {
            "input": {"path": str(tmp_path / "prompts.parquet")},
            "output": {"path": str(tmp_path / out)},
            "model": model,
            "generation": {"width": 32, "height": 32, "num_inference_steps": steps, "guidance_scale": 2.0},
            "workers": {"batch_size": 3},
        }
    )


def _run(spec: imagemill.JobSpec) -> tuple[ShardWorker, dict[str, dict]]:
    """The shards run in-process; the worker and the metadata rows by id."""
    worker = ShardWorker(spec)
    worker.ready()
    for shard in plan_shards(spec.input).shards:
        worker.process_shard(shard)
    return worker, {row["id"]: row for row in read_metadata(spec.output.path).to_pylist()}


def test_images_change_with_the_scheduler_which_the_metadata_records(tmp_path, tiny_model):
    pq.write_table(prompt_table(3), tmp_path / "prompts.parquet")
    hashes, recorded = {}, {}
    for label, scheduler in SCHEDULERS.items():
        model = {"source": tiny_model} | ({"scheduler": scheduler} if scheduler else {})
        worker, rows = _run(_spec(tmp_path, model, label))
        assert all(row["status"] == "ok" for row in rows.values()), rows
        hashes[label] = tuple(rows[i]["sha256"] for i in sorted(rows))
        recorded[label] = {row["scheduler"] for row in rows.values()}
        if label == "lcm":  # the step-distilled scheduler ran the 4 steps asked for
            assert len(worker.generator.pipe.scheduler.timesteps) == STEPS
    assert len(set(hashes.values())) == len(SCHEDULERS), "each scheduler draws other images"
    assert recorded == {
        "default": {"DDIMScheduler"},  # the tiny model's own
        "euler_a": {"EulerAncestralDiscreteScheduler"},
        "dpmpp": {'DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", use_karras_sigmas=true)'},
        "lcm": {'LCMScheduler(timestep_spacing="trailing")'},
    }

    _, again = _run(_spec(tmp_path, {"source": tiny_model, "scheduler": SCHEDULERS["euler_a"]}, "again"))
    assert tuple(again[i]["sha256"] for i in sorted(again)) == hashes["euler_a"], (
        "an ancestral sampler's noise comes from the rows' seeds: the same bytes on a re-run"
    )


@pytest.mark.parametrize(
    ("model", "words"),
    [
        ({"scheduler": {"name": "NoSuchScheduler"}}, ["model.scheduler", "'NoSuchScheduler' is not a"]),
        ({"scheduler": {"name": "StableDiffusionPipeline"}}, ["not a diffusers scheduler"]),
        ({"scheduler": {"name": "os.system"}}, ["not a diffusers scheduler"]),
        ({"scheduler": {"name": "EulerDiscreteScheduler", "config": {"karras": True}}}, ["takes no karras"]),
        ({"kind": "noop", "scheduler": {"name": "LCMScheduler"}}, ["model.scheduler", "diffusers, not noop"]),
    ],
)
def test_unknown_schedulers_and_settings_are_refused_before_the_job_starts(
    tmp_path, tiny_model, model, words
):
    pq.write_table(prompt_table(3), tmp_path / "prompts.parquet")
    with pytest.raises(ImagemillError) as refused:  # before Ray starts: no cluster needed to refuse
        imagemill.run(_spec(tmp_path, {"source": tiny_model} | model, "out"), progress=False)
    message = str(refused.value)
    assert "\n" not in message and all(word in message for word in words), message


def test_a_changed_scheduler_is_refused_on_resume(tmp_path):
    pq.write_table(prompt_table(3), tmp_path / "prompts.parquet")
    first = _spec(tmp_path, {"source": "m", "scheduler": SCHEDULERS["euler_a"]}, "out")
    output = OutputLayout(first.output.path)
    plan = plan_shards(first.input)
    record = JobRecord(
        name="x",
        spec=first.redacted(),
        fingerprint=first.fingerprint(),
        versions={},
        started_at="",
        status="complete",
        shards_total=1,
        rows_total=3,
        input_rows=3,
        input_files=1,
        input_footers=plan.footers,
        run_id="r",
    )
    owned = OwnedOutput.unleased(output)
    write_job_record(owned, record)
    claim_output(first, owned, plan, overwrite=False)  # the same job resumes

    for other in (SCHEDULERS["lcm"], None):
        changed = _spec(tmp_path, {"source": "m"} | ({"scheduler": other} if other else {}), "out")
        with pytest.raises(ImagemillError) as refused:
            claim_output(changed, owned, plan, overwrite=False)
        assert "model.scheduler" in str(refused.value) and "\n" not in str(refused.value)
