"""Every shell command the README and the guides in docs/ show is run by a test, and every link there
leads somewhere. `RUN_BY` maps each command, as written, to the tests that run it; it is checked both
ways (a command with no test fails, and so does an entry whose command is no longer on any page), and
each test it names must exist. The commands with no other home run here: the demo model's trainer
(fewer steps), the contact sheet, `imagemill make-tiny-model`, CI's copy of the README's two commands
and the GPU quickstart's spec (the commands live in imagemill.demo and imagemill.reporting since the
layout moved them out of the actors' folder; these runs show they work from there)."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import run_cli, write_prompt_files
from doc_pages import ROOT, blocks, command, documented_commands, page_text, pages, section, shell_commands
from PIL import Image

from imagemill.cli.commands import main
from imagemill.testing.in_process import run_in_process

HERE = "tests/test_docs_commands.py"
GPU_INSTALL = ".venv/bin/pip install --index-url https://download.pytorch.org/whl/cu128 torch==2.13.0"

# Each documented command, as written, and the tests that run it (or, for what only CI or a GPU
# machine can run, check it against what CI and the Docker image run).
RUN_BY: dict[str, tuple[str, ...]] = {
    "python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 -e '.[test]' && .venv/bin/imagemill run "
    "jobs/demo.yaml": (f"{HERE}::test_ci_runs_the_readmes_two_commands", "tests/test_jobs.py::test_demo_job"),
    ".venv/bin/python -m pytest -q": (f"{HERE}::test_ci_runs_the_readmes_two_commands",),
    "python -m imagemill.demo.model train DIR": (
        f"{HERE}::test_the_demo_trainer_writes_a_pipeline_the_demo_job_can_load",
    ),
    "python -m imagemill.reporting.contact_sheet output/demo docs/demo-contact-sheet.png": (
        f"{HERE}::test_the_contact_sheet_is_drawn_from_a_jobs_output",
    ),
    "imagemill prompts jobs/augment_recipe.yaml shapes.parquet": (
        "tests/test_augmentation.py::test_the_recipe_writes_the_shipped_prompts_and_the_python_reads_the_labelled_set",
    ),
    "imagemill run jobs/augment.yaml --input shapes.parquet --output output/shapes --no-progress": (
        "tests/test_augmentation.py::test_the_recipe_writes_the_shipped_prompts_and_the_python_reads_the_labelled_set",
    ),
    "ray start --head && imagemill submit jobs/demo.yaml --address http://127.0.0.1:8265": (
        "tests/test_cluster_jobs.py::test_the_shipped_demo_submitted_as_is_succeeds_on_a_token_cluster",
    ),
    f"python3 -m venv .venv && {GPU_INSTALL}": (
        f"{HERE}::test_the_gpu_quickstart_installs_the_images_torch",
    ),
    ".venv/bin/pip install -e . && .venv/bin/imagemill run jobs/demo.yaml --output output/sd21 --model "
    "stabilityai/stable-diffusion-2-1-base --set model.dtype=float16 --set generation.width=512 --set "
    "generation.height=512 --set generation.num_inference_steps=30 --set generation.guidance_scale=7.5 --set "
    "workers.num_workers=null": (f"{HERE}::test_the_gpu_quickstart_runs_the_demo_job_on_a_hub_model",),
    "python -m imagemill.demo.sources jobs/img2img": (
        "tests/test_image_to_image.py::test_the_documented_command_redraws_the_shipped_sources",
    ),
    "python -m imagemill.demo.super_resolution train jobs/models/demo-sr": (
        "tests/test_demo_super_resolution.py::test_the_trainer_writes_weights_the_upscale_stage_loads",
    ),
    "imagemill run jobs/demo_upscale.yaml": (
        "tests/test_demo_super_resolution.py::test_the_shipped_demo_upscale_job_writes_128_pixel_images",
    ),
    "python -m imagemill.demo.super_resolution pairs jobs/sr_reference": (
        "tests/test_demo_super_resolution.py::test_the_pairs_command_redraws_the_shipped_pairs",
    ),
    "imagemill run jobs/demo_upscale_reference.yaml": (
        "tests/test_demo_super_resolution.py::test_the_reference_job_shows_the_benchmarks_margin_over_bicubic",
    ),
    "python -m imagemill.demo.super_resolution picture docs/upscale-demo.png": (
        "tests/test_demo_super_resolution.py::test_the_documented_command_draws_the_docs_picture",
    ),
    "imagemill run jobs/augment_img2img.yaml": (
        "tests/test_jobs.py::test_image_to_image_job_redraws_the_shipped_sources",
    ),
    "imagemill run jobs/enhance.yaml": (
        "tests/test_enhance_only.py::test_the_shipped_enhance_job_upscales_the_shipped_sources",
    ),
    "python -m imagemill.demo.sources jobs/inpaint --inpaint": (
        "tests/test_inpainting.py::test_the_documented_command_redraws_the_shipped_inpainting_sources",
    ),
    "imagemill run jobs/inpaint.yaml": (
        "tests/test_jobs.py::test_inpainting_job_completes_the_shipped_masked_sources",
    ),
    "imagemill run jobs/nightly.yaml": (
        "tests/test_jobs.py::test_nightly_job_writes_each_night_to_its_own_prefix_and_only_new_input_is_new_work",
    ),
    "imagemill run jobs/nightly.yaml --date 2026-11-23": (
        "tests/test_jobs.py::test_nightly_job_writes_each_night_to_its_own_prefix_and_only_new_input_is_new_work",
    ),
    # the certificate how-to: its one test runs every command of that section, as written
    **dict.fromkeys(
        shell_commands(section("docs/provenance.md", "A certificate for C2PA")),
        ("tests/test_c2pa.py::test_the_guides_openssl_commands_make_a_chain_that_signs_and_verifies",),
    ),
    "imagemill run jobs/demo.yaml --output output/flux --model black-forest-labs/FLUX.1-dev --set "
    "model.dtype=bfloat16 --set model.offload=group --set generation.width=1024 --set generation.height=1024 "
    "--set generation.guidance_scale=3.5": (
        "tests/test_model_layout.py::test_the_guides_flux_command_asks_for_group_offload",
    ),
    "imagemill verify s3://imagemill-nightly/images/2026-11-23 --watermark nightly1": (
        "tests/test_c2pa.py::test_verify_passes_the_output_and_reports_a_tampered_image",
        "tests/test_watermark.py::test_the_watermark_survives_a_jpeg_q90_reencode_and_verify_reports_it",
    ),
}


def test_every_documented_command_is_run_by_a_test_and_every_entry_is_still_documented():
    shown = {line for commands in documented_commands().values() for line in commands}
    untested = sorted(shown - RUN_BY.keys())
    assert not untested, f"commands on a page with no test in RUN_BY: {untested}"
    vanished = sorted(RUN_BY.keys() - shown)
    assert not vanished, f"RUN_BY entries no page shows any more: {vanished}"


def test_every_test_run_by_names_exists():
    for tests in RUN_BY.values():
        for node in tests:
            path, _, name = node.partition("::")
            tree = ast.parse((ROOT / path).read_text())
            defined = {item.name for item in tree.body if isinstance(item, ast.FunctionDef)}
            assert name in defined, f"{node} (named in RUN_BY) does not exist"


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation but `-` and `_` dropped, spaces `-`."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    return {_slug(title) for title in re.findall(r"^#+ (.+)$", text, re.M)}


def test_every_relative_link_leads_to_a_file_and_its_anchor():
    broken = []
    for page in pages():
        prose = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", prose):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            file, _, anchor = target.partition("#")
            linked = (page.parent / file).resolve() if file else page
            if not linked.exists() or (anchor and anchor not in _anchors(linked)):
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, f"links to no file or no heading: {broken}"


def test_the_readme_is_a_front_door():
    readme = page_text("README.md")
    assert len(readme.splitlines()) <= 250, "the README is a front door; its reference goes under docs/"
    for guide in ("docs/augmentation.md", "docs/nightly.md", "docs/cluster.md"):
        assert f"]({guide})" in readme, f"the README does not link the user path {guide}"
    tasks = {  # issue #25's image tasks, each with its guide
        "super-resolution": "docs/upscale.md",
        "inpainting": "docs/image-to-image.md#inpainting",
        "enhancement": "docs/upscale.md#enhance-only-your-own-images-no-model",
    }
    for task, guide in tasks.items():
        assert f"[{task}]({guide})" in readme, f"the README does not link {task}'s guide {guide}"
    unlinked = [page.name for page in pages()[1:] if f"](docs/{page.name})" not in readme]
    assert not unlinked, f"guides the README does not lead to: {unlinked}"


def test_ci_runs_the_readmes_two_commands():
    """The README's first section, as CI's .ci/run runs it (there with pip's -q)."""
    ci = [line.replace(" -q ", " ") for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    venv, install, demo = " ".join(command("README.md", r"python3 -m venv")).split(" && ")
    assert venv in ci and install in ci, (venv, install)
    assert demo == ".venv/bin/imagemill run jobs/demo.yaml"  # as tests/test_jobs.py::test_demo_job runs it
    tests = " ".join(command("README.md", r"\.venv/bin/python -m pytest"))
    assert tests in ci


def test_the_gpu_quickstart_installs_the_images_torch():
    """The CUDA torch the GPU guide installs is infra/Dockerfile's (which builds with it)."""
    install = " ".join(command("docs/gpu.md", r"python3 -m venv")).split(" && ")[1]
    assert install == GPU_INSTALL
    dockerfile = (ROOT / "infra" / "Dockerfile").read_text()
    assert (
        f"RUN pip install --no-cache-dir {GPU_INSTALL.removeprefix('.venv/bin/pip install ')}" in dockerfile
    )


def test_the_gpu_quickstart_runs_the_demo_job_on_a_hub_model(monkeypatch, capsys):
    """The quickstart's command through the CLI, up to the runner: it takes the demo job with the hub
    model, in float16 at 512x512 (a GPU machine runs the rest; here the hub is offline)."""
    import imagemill.execution.runner as runner

    ran = []

    class Finished:
        state = "complete"

        def summary(self) -> str:
            return "finished"

    monkeypatch.setattr(runner, "run", lambda spec, **options: ran.append(spec) or Finished())
    monkeypatch.chdir(ROOT)
    words = " ".join(command("docs/gpu.md", r"\.venv/bin/pip install -e \.")).split(" && ")[1].split()
    assert words[:2] == [".venv/bin/imagemill", "run"]
    main(words[1:])
    [spec] = ran
    assert spec.model.source == "stabilityai/stable-diffusion-2-1-base" and spec.model.dtype == "float16"
    generation = spec.generation
    assert (generation.width, generation.height, generation.num_inference_steps) == (512, 512, 30)
    assert spec.workers.num_workers is None, "one worker per GPU"
    assert spec.name == "demo" and spec.output.path.endswith("output/sd21")


def _usage() -> dict[str, set[str]]:
    """The options the running guide's usage block shows, per subcommand."""
    [usage] = blocks(section("docs/running.md", "Commands"), "text")
    shown: dict[str, set[str]] = {}
    for line in usage.splitlines():
        if line.startswith("imagemill "):
            subcommand = line.split()[1]
        shown.setdefault(subcommand, set()).update(re.findall(r"--[a-z-]+", line.split("#")[0]))
    return shown


def test_the_usage_block_shows_every_subcommand_with_options_it_takes(capsys):
    shown = _usage()
    assert shown.keys() == {"run", "submit", "status", "verify", "prompts", "make-tiny-model"}
    for subcommand, options in shown.items():
        with pytest.raises(SystemExit):
            main([subcommand, "--help"])
        taken = set(re.findall(r"--[a-z-]+", capsys.readouterr().out))
        assert options <= taken, f"imagemill {subcommand} takes no {sorted(options - taken)}"


def test_the_running_guides_example_spec_loads():
    import imagemill

    [example] = blocks(section("docs/running.md", "The job spec"), "yaml")
    spec = imagemill.build_spec(yaml.safe_load(example))
    assert spec.input.rows_per_shard == "auto" and spec.workers.batch_size == 8


@pytest.mark.slow
def test_the_demo_trainer_writes_a_pipeline_the_demo_job_can_load(tmp_path):
    words = command("README.md", r"python -m imagemill\.demo\.model train DIR")
    assert words == ["python", "-m", "imagemill.demo.model", "train", "DIR"]
    target = tmp_path / "demo-shapes"
    done = subprocess.run(
        [sys.executable, *words[1:4], str(target), "--vae-steps", "2", "--unet-steps", "2"],
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
    [usage] = blocks(section("docs/running.md", "Commands"), "text")
    assert re.search(r"^imagemill make-tiny-model DIR \[--family sd\|sdxl", usage, re.M)
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
    words = command("README.md", r"python -m imagemill\.reporting\.contact_sheet output/demo \S+\.png")
    sheet = tmp_path / "sheet.png"
    done = subprocess.run(
        [sys.executable, *words[1:3], str(tmp_path / "out"), str(sheet)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    with Image.open(sheet) as image:
        assert image.format == "PNG" and image.width >= 6 * 32


def test_the_nightly_guides_spec_loads_and_uses_every_publishing_feature():
    """The nightly guide's spec is a valid job spec with the safety filter, parameters, watermark,
    C2PA, a budget and prices; jobs/nightly.yaml has the safety filter and parameters."""
    from imagemill.core.spec import build_spec, load_spec

    [block] = blocks(page_text("docs/nightly.md"), "yaml")
    spec = build_spec(yaml.safe_load(block.replace("{date}", "2026-11-29")))
    assert spec.safety is not None and spec.safety.policy == "retry"
    out = spec.output
    assert out.embed_parameters == "public" and out.watermark is not None and out.c2pa is not None
    assert spec.workers.max_gpu_hours and spec.cost.gpu_hour_usd
    shipped = load_spec(ROOT / "jobs" / "nightly.yaml")
    assert shipped.safety is not None and shipped.output.embed_parameters == "public"
