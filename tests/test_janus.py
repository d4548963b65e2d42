"""model.kind: janus end to end, with a tiny random-weight Janus model built offline: a job in process
(testing.in_process: the real driver and worker, an actor's bytes), then the same rows through the CLI
and Ray with the model on S3."""

from __future__ import annotations

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import check_output, make_bucket, read_metadata, run_cli

import imagemill
from imagemill.testing.in_process import run_in_process
from imagemill.testing.tiny_janus import IMAGE_SIZE, make_tiny_janus
from imagemill.workers.generators.janus import JanusGenerator
from imagemill.workers.rows import BatchKey

CAT = "a red cat on a chair"
LONG = "a large blue house beside a green tree near the river at sunset " * 8  # more than the context takes

# id, prompt, seed, negative prompt, guidance scale, steps: chosen so that with batch_size 2 the
# default rows batch as [twin-a, long], [twin-b, other], [seed-b, negative], and the rows asking for
# 7 steps as [steps-a, steps-b]: the same inputs, in the same shape, as the first batch.
ROWS = [
    ("twin-a", CAT, 5, None, None, None),
    ("long", LONG, 6, None, None, None),
    ("twin-b", CAT, 5, None, None, None),
    ("other", "a green tree", 7, None, None, None),
    ("seed-b", CAT, 8, None, None, None),
    ("negative", CAT, 5, "blurry dark", None, None),
    ("guidance-1", CAT, 5, None, 1.0, None),
    ("steps-a", CAT, 5, None, None, 7),
    ("steps-b", LONG, 6, None, None, 7),
]


@pytest.fixture(scope="module")
def tiny_janus(tmp_path_factory) -> str:
    return str(make_tiny_janus(tmp_path_factory.mktemp("models") / "tiny-janus"))


def _write_rows(path, rows: list[tuple], **columns: pa.Array) -> None:
    ids, prompts, seeds, negatives, guidance, steps = zip(*rows, strict=True)
    table = pa.table(
        {
            "id": list(ids),
            "prompt": list(prompts),
            "seed": pa.array(seeds, pa.int64()),
            "negative_prompt": pa.array(negatives, pa.string()),
            "guidance_scale": pa.array(guidance, pa.float64()),
            "num_inference_steps": pa.array(steps, pa.int64()),
            **columns,
        }
    )
    pq.write_table(table, path)


def test_janus_job_end_to_end(ray_address, tmp_path, tiny_janus):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    _write_rows(prompts / "a.parquet", ROWS)
    generation = {"width": IMAGE_SIZE, "height": IMAGE_SIZE, "num_inference_steps": 1, "guidance_scale": 5.0}
    spec = imagemill.build_spec(
        {
            "input": {"path": str(prompts / "a.parquet")},
            # the files' bytes are compared across rows and runs: no parameters (they name the row)
            "output": {"path": str(tmp_path / "first"), "embed_parameters": "none"},
            "model": {"source": tiny_janus, "kind": "janus"},
            "generation": generation,
            "workers": {"num_workers": 1, "batch_size": 2},
        }
    )
    assert run_in_process(spec).ok == len(ROWS)
    first = check_output(str(tmp_path / "first"), {row[0] for row in ROWS}, IMAGE_SIZE, IMAGE_SIZE)

    # A row's image tokens depend on its prompt and seed alone: the same row in another batch of the
    # same size, with another neighbour and another padding length, gives the same bytes.
    assert first["twin-a"] == first["twin-b"]
    # num_inference_steps means nothing to Janus: the same batch asking for 7 steps is the same.
    assert (first["steps-a"], first["steps-b"]) == (first["twin-a"], first["long"])
    # Seed, negative prompt and guidance each change the image.
    assert len({first[name] for name in ("twin-a", "seed-b", "negative", "guidance-1", "other")}) == 5
    metadata = {row["id"]: row for row in read_metadata(str(tmp_path / "first")).to_pylist()}
    assert metadata["long"]["prompt_truncated"] and not metadata["twin-a"]["prompt_truncated"]

    # Again through the CLI, with the model on S3, and a second file whose rows ask for
    # sizes the model cannot make: those become error rows, and the first file's images are the same.
    _write_rows(
        prompts / "b.parquet",
        [("wide", CAT, 5, None, None, None), ("tall", CAT, 5, None, None, None)],
        width=pa.array([64, None], pa.int64()),
        height=pa.array([None, 48], pa.int64()),
    )
    bucket = make_bucket("janus")
    fsspec.filesystem("s3").put(tiny_janus, "janus/models/tiny-janus", recursive=True)
    job = tmp_path / "job.yaml"
    job.write_text(
        f"input: {{path: {prompts}}}\n"
        "output: {path: second, embed_parameters: none}\n"
        f"model: {{source: {bucket}/models/tiny-janus, kind: janus}}\n"
        f"generation: {generation}\n"
        "workers: {num_workers: 1, batch_size: 2}\n"
    )
    done = run_cli("run", str(job), "--no-progress", cwd=tmp_path, ray_address=ray_address)
    assert done.returncode == 0, done.stderr
    assert f"{len(ROWS) + 2} rows: {len(ROWS)} ok, 2 error" in done.stdout
    rows = {row["id"]: row for row in read_metadata(str(tmp_path / "second")).to_pylist()}
    assert {name: rows[name]["sha256"] for name in first} == first
    for name, size in (("wide", "64x32"), ("tall", "32x48")):
        assert rows[name]["status"] == "error"
        assert rows[name]["error"] == (
            f"model_rejected: this Janus model makes 32x32 images only, not {size}; set generation.width "
            "and generation.height (or the rows' width/height) to 32"
        )


class _GreedyJanus(JanusGenerator):
    """The generator with the most likely token drawn at every step, to compare with transformers."""

    @staticmethod
    def _draw(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1)


@pytest.mark.model
def test_janus_loop_is_transformers_image_generation(tiny_janus):
    """Our per-row-seeded loop computes what JanusForConditionalGeneration.generate does: with greedy
    draws, a padded batch with guidance gives the same image tokens, hence the same images."""
    generator = _GreedyJanus(tiny_janus, "float32", "cpu")
    prompts = [CAT, "a blue dog on a boat in the sea near a big tree"]
    ours = generator.generate(prompts, [None, None], [1, 2], BatchKey(IMAGE_SIZE, IMAGE_SIZE, 1, 5.0))

    processor, model = generator.processor, generator.model
    texts = processor.apply_chat_template(
        [[{"role": "user", "content": [{"type": "text", "text": text}]}] for text in prompts],
        add_generation_prompt=True,
        tokenize=False,
    )
    inputs = processor(text=texts, generation_mode="image", padding=True, return_tensors="pt")
    tokens = model.generate(**inputs, generation_mode="image", do_sample=False, guidance_scale=5.0)
    reference = (model.decode_image_tokens(tokens).clamp(-1, 1) + 1) * 127.5  # Janus's own [-1, 1] -> pixels
    assert ours.shape == reference.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert (reference.round() - ours).abs().max() <= 1  # float rounding may differ by one at .5
