"""Every supported family end to end: a tiny random-weight model of it, a job, its images.

Each family's tiny model is built from its own diffusers classes (pipeline/testing/tiny_families.py),
saved, and loaded back by the ShardWorker through DiffusionPipeline.from_pretrained, as a user's model
would be. SD's job runs through Ray's actors; the others run in process (testing.in_process: the same
driver and worker, the same bytes), as what differs between families is the worker's, not Ray's.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import as_pixels, read_metadata
from PIL import Image

import imagemill
from imagemill.testing import FAMILIES
from imagemill.testing.in_process import run_in_process
from imagemill.testing.tiny_families import make_tiny_family
from imagemill.workers.generators.diffusion.generator import DiffusersGenerator
from imagemill.workers.rows import BatchKey

WIDTH, HEIGHT = 64, 32  # not square, so a swapped width and height shows; Sana needs multiples of 32
ODD_WIDTH = 40  # SD, SDXL and PixArt take multiples of 8; SD3 and FLUX refuse it (16), Sana too (32)
REFUSE_ODD_WIDTH = {"sd3", "flux", "sana"}


@pytest.fixture(scope="session")
def family_models(tmp_path_factory, tiny_model) -> dict[str, str]:
    root = tmp_path_factory.mktemp("families")
    models = {family: str(make_tiny_family(family, root / family)) for family in FAMILIES if family != "sd"}
    return {"sd": tiny_model, **models}


def _prompts(path) -> None:
    """Two files of the same rows, under other ids: each row is computed twice, in the same batch."""
    for copy in ("a", "b"):
        table = pa.table(
            {
                "id": [f"{copy}-{name}" for name in ("cat-1", "cat-2", "dog", "star", "odd-size")],
                "prompt": ["a red cat", "a red cat", "a blue dog on the left", "a gold star", "a tree"],
                "seed": pa.array([1, 2, 3, 4, 5], pa.int64()),  # cat-1 and cat-2: same prompt, other seed
                "negative_prompt": [None, None, "blurry", None, None],
                "width": pa.array([None, None, None, None, ODD_WIDTH], pa.int64()),
            }
        )
        pq.write_table(table, path / f"{copy}.parquet")


def _run_job(family: str, source: str, root: Path) -> Path:
    (root / "prompts").mkdir()
    _prompts(root / "prompts")
    spec = imagemill.build_spec(
        {
            "name": f"family-{family}",
            "input": {"path": str(root / "prompts"), "rows_per_shard": 5},
            # a- and b- rows' files are compared byte for byte: no parameters (they name the row's id)
            "output": {"path": str(root / "out"), "embed_parameters": "none"},
            "model": {"source": source},
            "generation": {"width": WIDTH, "height": HEIGHT, "num_inference_steps": 2, "guidance_scale": 4.0},
            "workers": {"num_workers": 1, "batch_size": 4},
        }
    )
    result = imagemill.run(spec, progress=False) if family == "sd" else run_in_process(spec)
    assert result.complete
    return root / "out"


@pytest.mark.parametrize("family", FAMILIES)
def test_family_end_to_end(ray_session, tmp_path, family_models, family):
    output = _run_job(family, family_models[family], tmp_path)
    rows = {row["id"]: row for row in read_metadata(str(output)).to_pylist()}
    assert len(rows) == 10 and (output / "_SUCCESS").exists()

    for copy in ("a", "b"):
        odd = rows.pop(f"{copy}-odd-size")
        if family in REFUSE_ODD_WIDTH:  # the pipeline's refusal (FLUX would resize: imagemill refuses)
            assert odd["status"] == "error" and odd["error"].startswith("model_rejected: "), odd
            assert str(ODD_WIDTH) in odd["error"]
        else:
            assert odd["status"] == "ok" and Image.open(output / odd["path"]).size == (ODD_WIDTH, HEIGHT)
    for row in rows.values():
        assert row["status"] == "ok", row
        assert (row["model"], row["width"], row["height"]) == (family_models[family], WIDTH, HEIGHT)
        image = Image.open(io.BytesIO((output / row["path"]).read_bytes()))
        assert image.size == (WIDTH, HEIGHT) and image.mode == "RGB"
        assert np.asarray(image).std() > 0, "a blank image"
    assert rows["a-dog"]["negative_prompt"] == "blurry" and rows["a-cat-1"]["seed"] == 1
    first = {name[2:]: row["sha256"] for name, row in rows.items() if name.startswith("a-")}
    second = {name[2:]: row["sha256"] for name, row in rows.items() if name.startswith("b-")}
    assert first == second, "the same rows computed again must give the same bytes"
    assert len(set(first.values())) == 4, "another seed must give another image"


def _pipeline_images(pipe, prompts, negatives, seeds) -> np.ndarray:
    """What the pipeline itself makes from the texts, with imagemill's fixed settings; negatives None:
    the pipeline's own default for no negative prompt."""
    name, options = type(pipe).__name__, {}
    if name.startswith(("PixArt", "Sana")):
        options = {"use_resolution_binning": False, "clean_caption": False}
    if negatives is not None and not name.startswith("Flux"):  # FLUX is guidance-distilled: no negatives
        options["negative_prompt"] = negatives
    with torch.inference_mode():
        images = pipe(
            prompt=prompts,
            num_inference_steps=2,
            guidance_scale=4.0,
            width=WIDTH,
            height=HEIGHT,
            generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],
            output_type="pt",
            **options,
        ).images
    return as_pixels(images)


@pytest.mark.parametrize(
    "family", [family for family in FAMILIES if family != "sd"]
)  # SD: test_text_encoding
def test_cached_embeddings_give_what_the_pipeline_gives(family_models, family):
    """The per-text embedding cache feeds each family the arguments its own text path would make,
    with negative prompts and without (SDXL: zeros), and truncation is judged by its longest encoder."""
    generator = DiffusersGenerator(family_models[family], "float32", "cpu")
    prompts, seeds, key = ["a red cat", "a blue dog"], [11, 12], BatchKey(WIDTH, HEIGHT, 2, 4.0)
    for negatives in (["blurry", "dark"], None):
        ours = generator.generate(prompts, negatives or [None, None], seeds, key).numpy()
        np.testing.assert_array_equal(ours, _pipeline_images(generator.pipe, prompts, negatives, seeds))
    assert generator.truncated(["a red cat", "red " * 100, "red " * 600]) == [False, family in {"sdxl"}, True]
