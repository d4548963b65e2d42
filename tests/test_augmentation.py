"""The augmentation guide (docs/augmentation.md), run as written in a fresh working folder, and the
proof that its data trains a model (issue #15, acceptance 5 and 6).

One job through Ray (the guide's: 225 recipe prompts x 2 seeds with the demo model, labels carried
into WebDataset tars); a CNN then learns shapes from those 450 images and is tested on drawn ones.
The slow case of the suite: about two minutes on two quiet cores, most of it the job and the CNN.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import read_metadata, run_cli
from doc_pages import blocks, page_text

from imagemill.demo.classifier import augmentation_figures, webdataset_samples
from imagemill.demo.shapes import SHAPES
from imagemill.prompts.recipes import Recipe, recipe_table

REPO = Path(__file__).resolve().parents[1]
GUIDE = page_text("docs/augmentation.md")


@pytest.fixture(scope="module")
def workdir(ray_address, tmp_path_factory) -> Path:
    """A folder where a fresh checkout's jobs/ is, after the guide's shell commands ran there."""
    folder = tmp_path_factory.mktemp("augment")
    (folder / "jobs").symlink_to(REPO / "jobs")
    (commands,) = blocks(GUIDE, "bash")
    for line in commands.splitlines():
        program, *arguments = shlex.split(line)
        assert program == "imagemill", line
        done = run_cli(*arguments, ray_address=ray_address, cwd=folder)
        assert done.returncode == 0, f"{line}: {done.stderr}"
    return folder


@pytest.mark.slow
def test_the_recipe_writes_the_shipped_prompts_and_the_python_reads_the_labelled_set(workdir):
    shipped = (REPO / "jobs" / "augment_prompts.parquet").read_bytes()
    assert (workdir / "shapes.parquet").read_bytes() == shipped, "regenerate jobs/augment_prompts.parquet"
    (code,) = blocks(GUIDE, "python")
    env = {**os.environ, "HF_DATASETS_CACHE": str(workdir / "hf-cache")}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=workdir, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert "batch (64, 3, 32, 32) labels [0, 1, 2]" in done.stdout  # shuffled, of interleaved classes
    assert "450 samples; first: square 1" in done.stdout  # the interleaved file begins with a square
    rows = read_metadata(str(workdir / "output" / "shapes")).to_pylist()
    ids = {f"{name}-{k}_{j}" for name in SHAPES for k in range(75) for j in range(2)}
    assert {row["id"] for row in rows} == ids, "each prompt twice, as <id>_0 and <id>_1"
    assert len({row["seed"] for row in rows}) == 450 and {row["status"] for row in rows} == {"ok"}
    assert all(row["label"] == SHAPES.index(row["class_name"]) for row in rows), "labels carried"


@pytest.mark.slow
def test_the_generated_set_trains_a_cnn_that_reads_drawn_shapes_and_augments_a_few_drawn_ones(workdir):
    images, labels = webdataset_samples(workdir / "output" / "shapes")
    assert images.shape == (450, 32, 32, 3)
    assert Counter(labels.tolist()) == {label: 150 for label in range(len(SHAPES))}
    figures = augmentation_figures((images, labels))
    assert figures["synthetic"] >= 0.8, figures
    assert figures["few_drawn_plus_synthetic"] >= figures["few_drawn"] + 0.25, figures


def test_the_guides_recipe_example_is_a_recipe_with_the_quotas_it_states():
    (example,) = blocks(GUIDE, "yaml")
    table = recipe_table(Recipe.model_validate(yaml.safe_load(example)))
    assert Counter(table["class_name"].to_pylist()) == {"golden retriever": 16, "tabby cat": 8}
