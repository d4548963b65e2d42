"""The README's other commands, run as a user types them (the demo job and the tests are run elsewhere):
the demo model's trainer (with fewer steps), the contact sheet, and `imagemill make-tiny-model`
(`readme_section` and `readme_blocks` give other tests a section's commands and code as written).
They live in imagemill.demo and imagemill.testing since the layout moved them out of the actors'
folder; these runs show the commands still work from there."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli, write_prompt_files
from PIL import Image

from imagemill.testing.in_process import run_in_process

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _readme_command(pattern: str) -> list[str]:
    """The README's command matching `pattern`, split into words (it must be there, as written)."""
    match = re.search(pattern, README)
    assert match, f"the README no longer shows a command matching {pattern!r}"
    return match.group(0).split()


def readme_section(title: str) -> str:
    """The README's section headed `title`, up to the next heading of its level or above (lines in
    code blocks, such as `# comments`, are no headings)."""
    lines = README.splitlines(keepends=True)
    heading = re.compile(rf"(#+) {re.escape(title)}\n")
    first = next((i for i, line in enumerate(lines) if heading.fullmatch(line)), None)
    assert first is not None, f"the README has no section {title!r}"
    level, fenced, body = len(heading.fullmatch(lines[first]).group(1)), False, []
    for line in lines[first + 1 :]:
        fenced ^= line.startswith("```")
        if not fenced and re.match(rf"#{{1,{level}}} ", line):
            break
        body.append(line)
    return "".join(body)


def readme_blocks(section: str, language: str) -> list[str]:
    """The fenced code blocks of `language` in a README section, as written."""
    return re.findall(rf"^```{language}\n(.*?)^```", section, re.M | re.S)


@pytest.mark.model
def test_the_demo_trainer_writes_a_pipeline_the_demo_job_can_load(tmp_path):
    command = _readme_command(r"python -m imagemill\.demo\.model train DIR")
    assert command[:5] == ["python", "-m", "imagemill.demo.model", "train", "DIR"]
    target = tmp_path / "demo-shapes"
    done = subprocess.run(
        [sys.executable, *command[1:4], str(target), "--vae-steps", "2", "--unet-steps", "2"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert f"demo model written to {target}" in done.stdout
    index = json.loads((target / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert list(target.glob("unet/*.safetensors")), "weights are saved as safetensors"


@pytest.mark.cli
def test_make_tiny_model_writes_a_pipeline(tmp_path):
    command = _readme_command(r"imagemill make-tiny-model DIR")
    assert command[:2] == ["imagemill", "make-tiny-model"]
    done = run_cli("make-tiny-model", str(tmp_path / "tiny"), "--family", "sdxl")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "tiny" / "model_index.json").is_file()


def test_the_contact_sheet_is_drawn_from_a_jobs_output(tmp_path, tiny_model):
    """The job's output comes from the in-process runner: the sheet reads an output, not Ray."""
    import imagemill

    prompts = tmp_path / "prompts"
    write_prompt_files(str(prompts), n_files=1, rows_per_file=6, row_group_size=6)
    spec = imagemill.build_spec(
        {
            "name": "sheet",
            "input": {"path": str(prompts)},
            "output": {"path": str(tmp_path / "out")},
            "model": {"source": tiny_model, "dtype": "float32"},
            "generation": {"width": 32, "height": 32, "num_inference_steps": 2},
            "workers": {"num_workers": 1, "batch_size": 6},
        }
    )
    assert run_in_process(spec).ok == 6
    command = _readme_command(r"python -m imagemill\.contact_sheet output/demo \S+\.png")
    sheet = tmp_path / "sheet.png"
    done = subprocess.run(
        [sys.executable, *command[1:3], str(tmp_path / "out"), str(sheet)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    with Image.open(sheet) as image:
        assert image.format == "PNG" and image.width >= 6 * 32


def test_the_nightly_section_spec_loads_and_uses_every_publishing_feature():
    """The README's publishable nightly spec is a valid job spec with the safety filter, parameters,
    watermark, C2PA, a budget and prices; jobs/nightly.yaml has the safety filter and parameters."""
    import yaml

    from imagemill.core.spec import build_spec, load_spec

    [block] = readme_blocks(readme_section("A publishable nightly job"), "yaml")
    spec = build_spec(yaml.safe_load(block.replace("{date}", "2026-11-29")))
    assert spec.safety is not None and spec.safety.policy == "retry"
    out = spec.output
    assert out.embed_parameters and out.watermark is not None and out.c2pa is not None
    assert spec.workers.max_gpu_hours and spec.cost.gpu_hour_usd
    shipped = load_spec(Path(__file__).resolve().parent.parent / "jobs" / "nightly.yaml")
    assert shipped.safety is not None and shipped.output.embed_parameters
