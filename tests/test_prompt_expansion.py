"""Prompt expansion by a tiny random-weight causal LM: loaded by the real path, run through Ray, resumed.

The reference job runs in process (testing.in_process: the real driver and ShardWorker, the bytes an
actor writes); the expander pool and the killed and resumed CLI jobs, compared with it, go through Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from subprocess import DEVNULL

import pyarrow as pa
import pytest
from conftest import check_output, read_metadata, run_cli, write_prompt_files
from transformers import AutoModelForCausalLM, AutoTokenizer

import imagemill
from imagemill.core.errors import ImagemillError
from imagemill.core.model_source import check_source
from imagemill.core.shard import Shard
from imagemill.core.spec import ExpansionSpec, GenerationSpec, InputSpec, parse_overrides
from imagemill.testing.in_process import run_in_process
from imagemill.workers.rows import prepare_rows
from imagemill.workers.stages.expansion import PromptExpander, expansion_batches

ROWS, VARIANTS, IMAGES = 24, 2, 2
JOB = """\
name: expand-test
input: {{path: {input}, rows_per_shard: 4}}
output: {{path: {output}}}
model: {{source: {model}}}
generation:
  {{width: 32, height: 32, num_inference_steps: 1, guidance_scale: 3.0, images_per_prompt: {images}}}
workers: {{num_workers: 1, batch_size: 4}}
expansion:
  source: {lm}
  template: "describe a photo of {{prompt}} in one detailed sentence:"
  max_new_tokens: 12
  do_sample: true
  top_p: 0.9
  n_variants: {variants}
  batch_size: 3
"""


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> str:
    from imagemill.testing.tiny_lm import make_tiny_lm

    return str(make_tiny_lm(tmp_path_factory.mktemp("models") / "tiny-lm"))


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_model, tiny_lm) -> Path:
    """A job spec over 24 prompts (2 files, 6 shards): 2 variants of each, 2 images of each variant."""
    folder = tmp_path_factory.mktemp("expand")
    write_prompt_files(str(folder / "prompts"), n_files=2, rows_per_file=ROWS // 2, row_group_size=4)
    path = folder / "job.yaml"
    text = JOB.format(
        input=folder / "prompts", output="out", model=tiny_model, lm=tiny_lm, images=IMAGES, variants=VARIANTS
    )
    path.write_text(text)
    return path


def _run(job: Path, output: Path, *overrides: str, in_process: bool = False) -> imagemill.JobResult:
    """The job run from this process (through the session's Ray, or `in_process` without actors), to
    `output`, with `--set` style overrides."""
    spec = imagemill.load_spec(job, parse_overrides([f"output.path={output}", *overrides]))
    result = run_in_process(spec) if in_process else imagemill.run(spec, progress=False)
    assert result.complete and (result.ok, result.errors) == (ROWS * VARIANTS * IMAGES, 0)
    return result


def _outcome(output: Path) -> dict[str, tuple[str, str]]:
    """{id: (expanded prompt, image sha256)}: what a run produced, to compare runs."""
    return {
        row["id"]: (row["expanded_prompt"], row["sha256"]) for row in read_metadata(str(output)).to_pylist()
    }


def _ids() -> set[str]:
    return {f"row-{i:05d}_v{v}_{k}" for i in range(ROWS) for v in range(VARIANTS) for k in range(IMAGES)}


@pytest.fixture(scope="module")
def reference(job) -> Path:
    """The job run once, unbroken, with expansion on the ShardWorker (placement: actor)."""
    output = job.parent / "reference"
    _run(job, output, in_process=True)
    return output


def test_variants_have_stable_derived_ids_their_own_expansion_and_seeds(reference):
    hashes = check_output(str(reference), _ids(), 32, 32)
    rows = {row["id"]: row for row in read_metadata(str(reference)).to_pylist()}
    assert len(set(hashes.values())) == len(rows) and len({row["seed"] for row in rows.values()}) == len(rows)
    for i in range(ROWS):
        base = f"row-{i:05d}"
        variants = [[rows[f"{base}_v{v}_{k}"] for k in range(IMAGES)] for v in range(VARIANTS)]
        assert {row["prompt"] for variant in variants for row in variant} == {rows[f"{base}_v0_0"]["prompt"]}
        expanded = [{row["expanded_prompt"] for row in variant} for variant in variants]
        assert all(len(texts) == 1 for texts in expanded), "a variant's images share its expanded prompt"
        texts = [texts.pop() for texts in expanded]
        assert len(set(texts)) == VARIANTS, "each variant is its own expansion"
        assert all(text and text != rows[f"{base}_v0_0"]["prompt"] and "\n" not in text for text in texts)
    stats = [json.loads(path.read_text()) for path in (reference / "shards").glob("*.json")]
    assert all(shard["expand_seconds"] > 0 for shard in stats)
    report = json.loads((reference / "report.json").read_text())
    assert "expand" in report["stage_seconds"]
    assert all(
        sample["expanded_prompt"] == rows[sample["id"]]["expanded_prompt"] for sample in report["samples"]
    )


def test_an_expander_pool_gives_the_same_prompts_and_images_as_expansion_on_the_workers(
    job, reference, ray_session
):
    """Placement decides where expansion runs, not what it writes: the same batches on the same device."""
    output = job.parent / "pool"
    _run(job, output, "expansion.placement=pool")
    check_output(str(output), _ids(), 32, 32)
    assert _outcome(output) == _outcome(reference)


def _commits(output: Path) -> int:
    return len(list((output / "shards").glob("*.json")))


def test_a_killed_job_with_expansion_resumes_to_the_same_prompts_and_images(job, reference, ray_address):
    output = job.parent / "resumed"
    command = [
        sys.executable,
        "-m",
        "imagemill.cli",
        "run",
        str(job),
        "--output",
        str(output),
        "--no-progress",
    ]
    driver = subprocess.Popen(
        command, env={**os.environ, "RAY_ADDRESS": ray_address}, stdout=DEVNULL, stderr=DEVNULL
    )
    deadline = time.time() + 120
    while _commits(output) < 2:  # two shards committed, then into the middle of the next ones
        assert driver.poll() is None and time.time() < deadline, "the driver ended on its own"
        time.sleep(0.02)
    time.sleep(0.05)
    driver.kill()  # SIGKILL: no cleanup of any kind
    driver.wait()
    assert _commits(output) < 6, "every shard was done before the kill: make the job longer"
    done = run_cli("run", str(job), "--output", str(output), "--no-progress", ray_address=ray_address)
    assert done.returncode == 0, done.stderr
    assert f"{ROWS * VARIANTS * IMAGES} ok, 0 error in 6/6 shards" in done.stdout
    check_output(str(output), _ids(), 32, 32)
    assert _outcome(output) == _outcome(reference)


@pytest.mark.model
def test_sampled_expansion_depends_on_the_row_seed_not_on_its_batch(tiny_lm):
    spec = ExpansionSpec(source=tiny_lm, max_new_tokens=10, do_sample=True, temperature=0.8)
    expander = PromptExpander(spec, "cpu")
    prompts, seeds = ["a red cat", "a blue boat on the lake", "a tree", "a dog"], [11, 12, 13, 14]
    together = expander.expand(prompts, seeds)
    assert [expander.expand([p], [s])[0] for p, s in zip(prompts, seeds, strict=True)] == together
    assert expander.expand(prompts[::-1], seeds[::-1]) == together[::-1]
    assert len(set(expander.expand(["a red cat"] * 4, [1, 2, 3, 4]))) == 4, "other seeds, other texts"
    greedy = PromptExpander(ExpansionSpec(source=tiny_lm, max_new_tokens=10), "cpu")
    assert greedy.expand(prompts, [0] * 4) == greedy.expand(prompts, [1] * 4)
    assert all(text and text != prompt for text, prompt in zip(together, prompts, strict=True))


@pytest.mark.parametrize(
    ("expansion", "message"),
    [
        ({"template": "describe a photo"}, r"expansion\.template: .*must contain \{prompt\}"),
        ({"n_variants": 3}, r"expansion: .*n_variants > 1 needs do_sample: true"),
    ],
)
def test_invalid_expansion_settings_are_named(expansion, message):
    with pytest.raises(ImagemillError, match=message):
        imagemill.build_spec(
            {"input": {"path": "x"}, "output": {"path": "y"}, "model": {"kind": "noop"},
             "expansion": {"source": "some/lm", **expansion}}
        )  # fmt: skip


def test_expansion_settings_that_decide_the_output_are_in_the_fingerprint():
    spec = {"input": {"path": "x"}, "output": {"path": "y"}, "model": {"kind": "noop"}}
    assert imagemill.build_spec(spec).fingerprint()["expansion"] is None
    expanded = imagemill.build_spec({**spec, "expansion": {"source": "some/lm", "placement": "pool"}})
    fingerprint = expanded.fingerprint()["expansion"]
    assert fingerprint["template"] and fingerprint["source"] == "some/lm" and "placement" not in fingerprint
    assert expanded.images_per_row == 1


def test_an_expansion_source_that_is_not_a_language_model_is_refused_in_one_line(tmp_path, tiny_model):
    with pytest.raises(
        ImagemillError,
        match=r"expansion model directory .* has no config\.json; it must be a transformers causal LM",
    ):
        check_source("expansion", ExpansionSpec(source=tiny_model))


def test_variant_rows_get_derived_ids_own_seeds_and_one_expansion_per_variant():
    table = pa.table({"id": ["a", "b"], "prompt": ["a cat", "a dog"], "seed": [100, None]})
    shard = Shard("s", "file:///p.parquet", "p", 0, 1, first_row=0, num_rows=2)
    rows = prepare_rows(table, shard, InputSpec(path="/p"), GenerationSpec(images_per_prompt=2), n_variants=3)
    assert [row.row_id for row in rows[:6]] == ["a_v0_0", "a_v0_1", "a_v1_0", "a_v1_1", "a_v2_0", "a_v2_1"]
    assert [row.seed for row in rows[:6]] == list(range(100, 106)), "a given seed counts up over the images"
    assert len({row.seed for row in rows}) == 12
    batches = expansion_batches(rows, batch_size=4)
    assert [[row.variant_id for row in batch] for batch in batches] == [
        ["a_v0", "a_v1", "a_v2", "b_v0"],
        ["b_v1", "b_v2"],
    ]


def test_an_empty_expansion_falls_back_to_the_input_prompt(tiny_lm, tmp_path):
    """A model whose last norm is zeroed gives equal logits everywhere: greedy writes token 0, the
    padding token, which decodes to nothing."""
    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    model.model.norm.weight.data.zero_()
    model.save_pretrained(tmp_path / "silent-lm")
    AutoTokenizer.from_pretrained(tiny_lm).save_pretrained(tmp_path / "silent-lm")
    expander = PromptExpander(ExpansionSpec(source=str(tmp_path / "silent-lm"), max_new_tokens=4), "cpu")
    assert expander.expand(["a red cat", "a dog"], [0, 1]) == ["a red cat", "a dog"]
