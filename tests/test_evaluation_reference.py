"""The evaluation against its reference: leakage (generated images that are copies of a reference
image) and a labelled reference (per-label FID/KID against that label's reference images)."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import read_metadata
from PIL import Image
from test_evaluation import _Features, _prompts, _run_shards, _spec

import imagemill
from imagemill.core.errors import ImagemillError
from imagemill.core.evaluation_results import LeakagePair
from imagemill.core.layout import LEAKAGE, OutputLayout
from imagemill.core.records import ShardStats
from imagemill.core.write_gate import OwnedOutput
from imagemill.demo.shapes import draw, scenes
from imagemill.evaluation.post_pass import evaluate
from imagemill.evaluation.reference import load_reference
from imagemill.reporting.report_dataset import dataset_tables
from imagemill.workers.stages.evaluation import FeatureModel, write_features


def _drawn(count: int, seed: int, shape: str | None = None) -> list[tuple[str, np.ndarray]]:
    """`count` drawn demo scenes (of one shape, if given) as (shape, (32, 32, 3) uint8)."""
    rng = np.random.default_rng(seed)
    chosen = [scene for scene in scenes(held_out=False) if shape in (None, scene.shape)]
    picks = rng.choice(len(chosen), size=count, replace=False)
    return [(chosen[i].shape, draw(chosen[i], rng)) for i in picks]


def test_leakage_marks_the_generated_image_copied_into_the_reference_and_only_it(
    tmp_path, tiny_model, tiny_clip
):
    reference = tmp_path / "reference"
    reference.mkdir()
    for index, (_, pixels) in enumerate(_drawn(6, seed=1)):
        Image.fromarray(pixels).save(reference / f"real-{index}.png")
    inputs = _prompts(tmp_path, [f"a red circle number {i}" for i in range(8)], seeds=list(range(8)))
    evaluation = {
        "source": tiny_clip,
        "reference": str(reference),
        "leakage": True,
        "duplicate_threshold": 0.999,
    }
    spec = _spec(inputs, tmp_path / "out", tiny_model, evaluation)
    committed = _run_shards(spec, actors=1)
    copied = sorted(read_metadata(spec.output.path).to_pylist(), key=lambda row: row["id"])[5]
    (reference / "copied").mkdir()
    shutil.copy(Path(spec.output.path) / copied["path"], reference / "copied" / "leak.png")

    result = evaluate(spec, OwnedOutput.unleased(OutputLayout(spec.output.path)), committed)

    marked = pq.read_table(Path(spec.output.path) / LEAKAGE).to_pylist()
    assert [(row["id"], row["reference"], row["reference_row"]) for row in marked] == [
        (copied["id"], "copied/leak.png", None)
    ]
    assert marked[0]["cosine"] >= 0.999 and marked[0]["position"] == 5
    assert result.leakage.images == 1
    assert result.leakage.examples == [
        LeakagePair(
            id=copied["id"], reference="copied/leak.png", reference_row=None, cosine=marked[0]["cosine"]
        )
    ]
    caption, _, rows = dataset_tables(result)[-1]
    assert caption.startswith("Leakage") and rows == [(copied["id"], "copied/leak.png", marked[0]["cosine"])]


def test_leakage_and_labels_need_a_reference_of_images(tmp_path):
    base = {"name": "x", "input": {"path": "in"}, "output": {"path": "out"}, "model": {"source": "m"}}
    for setting in ({"leakage": True}, {"reference_label_column": "label"}):
        for reference in ({}, {"reference": "s3://bucket/stats.npz"}):
            with pytest.raises(ImagemillError, match="needs a reference of images") as error:
                imagemill.build_spec({**base, "evaluation": {"source": "clip", **setting, **reference}})
            assert "\n" not in str(error.value)
    # the label column of a folder of image files: refused, naming a file
    Image.fromarray(_drawn(1, seed=0)[0][1]).save(tmp_path / "real.png")
    spec = imagemill.build_spec(
        {
            **base,
            "evaluation": {"source": "clip", "reference": str(tmp_path), "reference_label_column": "label"},
        }
    )
    with pytest.raises(ImagemillError, match="real.png is an image file"):
        load_reference(spec.evaluation, OwnedOutput.unleased(OutputLayout(str(tmp_path / "out"))), "cpu")


PER_LABEL = 6  # images per label on each side: KID's sample is all of both, as torchmetrics' subset


def test_a_labelled_reference_gives_each_label_its_own_fid_and_kid(tmp_path, tiny_clip):
    """Generated features written as actors write them (no generation); the reference is a Parquet of
    drawn images with a label column. Each label's FID/KID equals torchmetrics' on that label's images
    against that label's reference images; a label without reference images has none."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    real = _drawn(PER_LABEL, seed=2, shape="circle") + _drawn(PER_LABEL, seed=3, shape="square")
    buffers = []
    for _, pixels in real:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        buffers.append({"bytes": buffer.getvalue(), "path": None})
    reference = tmp_path / "reference.parquet"
    pq.write_table(pa.table({"image": buffers, "kind": [shape for shape, _ in real]}), reference)

    fake = [
        _drawn(PER_LABEL, seed=4 + i, shape=shape) for i, shape in enumerate(("circle", "square", "triangle"))
    ]
    fake_pixels = {batch[0][0]: np.stack([pixels for _, pixels in batch]) for batch in fake}
    evaluation = {"source": tiny_clip, "reference": str(reference), "reference_label_column": "kind"}
    spec = _spec(tmp_path, tmp_path / "out", "unused", evaluation)
    output = OutputLayout(spec.output.path)
    model = FeatureModel(spec.evaluation, "cpu")
    committed = {}
    for number, (shape, pixels) in enumerate(fake_pixels.items()):  # one shard per label
        shard_id = f"shard-{number}"
        ids = [f"{shape}-{i}" for i in range(PER_LABEL)]
        features = model.embed(torch.from_numpy(pixels))
        attempt = OwnedOutput.unleased(output).attempt(shard_id)
        write_features(attempt, ids, [shape] * PER_LABEL, features, model)
        attempt.publish()
        committed[shard_id] = ShardStats(
            shard_id=shard_id, rows=PER_LABEL, ok=PER_LABEL, error=0, finished_at="t"
        )

    result = evaluate(spec, OwnedOutput.unleased(output), committed)

    features = _Features(model)
    nchw = {shape: torch.from_numpy(pixels).permute(0, 3, 1, 2) for shape, pixels in fake_pixels.items()}
    real_nchw = {
        shape: torch.from_numpy(np.stack([p for s, p in real if s == shape])).permute(0, 3, 1, 2)
        for shape in ("circle", "square")
    }
    for shape in ("circle", "square"):
        fid = FrechetInceptionDistance(feature=features)
        kid = KernelInceptionDistance(feature=features, subsets=1, subset_size=PER_LABEL)
        for metric in (fid, kid):
            metric.update(real_nchw[shape], real=True)
            metric.update(nchw[shape], real=False)
        assert result.fid.per_label[shape] == pytest.approx(float(fid.compute()), rel=1e-3)
        assert result.kid.per_label[shape] == pytest.approx(float(kid.compute()[0]), rel=1e-3)
    assert "triangle" not in result.fid.per_label and "triangle" not in result.kid.per_label
    # job-wide: every generated image against the whole reference
    fid = FrechetInceptionDistance(feature=features)
    fid.update(torch.cat(list(real_nchw.values())), real=True)
    fid.update(torch.cat(list(nchw.values())), real=False)
    assert result.fid.all == pytest.approx(float(fid.compute()), rel=1e-3)
    # the per-label numbers are not the whole reference's: the labels are what changed them
    unlabelled = evaluate(
        spec.model_copy(
            update={"evaluation": spec.evaluation.model_copy(update={"reference_label_column": None})}
        ),
        OwnedOutput.unleased(output),
        committed,
    )
    assert unlabelled.fid.per_label["circle"] != pytest.approx(result.fid.per_label["circle"], rel=1e-3)
    assert "triangle" in unlabelled.fid.per_label


def test_the_new_settings_are_in_the_fingerprint_only_when_set():
    """Turning on leakage or a labelled reference is a change of the fingerprint, of that setting alone."""
    base = {"name": "x", "input": {"path": "in"}, "output": {"path": "out"}, "model": {"source": "m"}}
    evaluation = {"source": "clip", "reference": "real.parquet"}
    plain = imagemill.build_spec({**base, "evaluation": evaluation}).fingerprint()["evaluation"]
    for setting in ({"leakage": True}, {"reference_label_column": "kind"}):
        changed = imagemill.build_spec({**base, "evaluation": {**evaluation, **setting}}).fingerprint()
        assert changed["evaluation"] == plain | setting
