"""Dataset evaluation (`evaluation:`): features on the actors, mergeable statistics, FID/KID against a
reference (compared with torchmetrics on the same images and feature model), near-duplicates.

The shards run in-process (two `ShardWorker`s standing for two actors, no Ray): what is under test is
what they write and what the driver's post-pass makes of it.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import read_metadata
from PIL import Image

import imagemill
from imagemill.evaluation import evaluate, merged_feature_sums
from imagemill.features import JOB_WIDE, FeatureSums
from imagemill.output import OutputLayout
from imagemill.shards import plan_shards
from imagemill.workers.stages.evaluation import FeatureModel
from imagemill.workers.worker import ShardWorker

SIZE = 32
ROWS = 24  # three shards of 8; as many reference images, so KID's sample is all of both sides


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    from imagemill.testing.tiny_model import make_tiny_clip

    return str(make_tiny_clip(tmp_path_factory.mktemp("models") / "tiny-clip"))


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory) -> Path:
    """24 'real' images: the demo world's drawn shapes."""
    from imagemill.demo.shapes import draw, scenes

    folder = tmp_path_factory.mktemp("reference")
    rng = np.random.default_rng(0)
    for index, scene in enumerate(scenes(held_out=False)[:ROWS]):
        Image.fromarray(draw(scene, rng)).save(folder / f"real-{index:02d}.png")
    return folder


def _prompts(folder: Path, prompts: list[str], seeds: list[int] | None = None) -> Path:
    import pyarrow as pa

    columns = {"id": [f"row-{i:03d}" for i in range(len(prompts))], "prompt": prompts}
    if seeds is not None:
        columns["seed"] = seeds
    pq.write_table(pa.table(columns), folder / "prompts.parquet", row_group_size=8)
    return folder


def _spec(inputs: Path, output: Path, model: str, evaluation: dict, **output_extra) -> imagemill.JobSpec:
    return imagemill.build_spec(
        {
            "name": output.name,
            "input": {"path": str(inputs), "rows_per_shard": 8},
            "output": {"path": str(output), **output_extra},
            "model": {"source": model},
            "generation": {"width": SIZE, "height": SIZE, "num_inference_steps": 2, "seed": 3},
            "workers": {"batch_size": 4},
            "evaluation": evaluation,
        }
    )


def _run_shards(spec: imagemill.JobSpec, actors: int = 2) -> dict:
    """Every shard of the spec, dealt round-robin to `actors` in-process shard workers."""
    workers = [ShardWorker(spec) for _ in range(actors)]
    for worker in workers:
        worker.ready()  # raises what failed to load
    shards = plan_shards(spec.input).shards
    return {shard.shard_id: workers[i % actors].process_shard(shard) for i, shard in enumerate(shards)}


def _written_images(output: str) -> torch.Tensor:
    """The job's images as written, (N, 3, H, W) uint8, in id order."""
    rows = sorted(read_metadata(output).to_pylist(), key=lambda row: row["id"])
    pixels = [np.asarray(Image.open(Path(output) / row["path"]).convert("RGB")) for row in rows if row["path"]]
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2)


class _Features(torch.nn.Module):
    """The job's feature model as torchmetrics takes a custom one: (N, 3, H, W) uint8 → (N, d)."""

    def __init__(self, model: FeatureModel):
        super().__init__()
        self.model = model
        self.num_features = model.dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.model.embed(images.permute(0, 2, 3, 1)))


def test_fid_and_kid_match_torchmetrics_and_shard_sums_merge_exactly(
    tmp_path, tiny_model, tiny_clip, reference_dir
):
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    inputs = _prompts(tmp_path, [f"a red circle number {i}" for i in range(ROWS)])
    spec = _spec(inputs, tmp_path / "out", tiny_model, {"source": tiny_clip, "reference": str(reference_dir)})
    committed = _run_shards(spec)
    output = OutputLayout(spec.output.path)
    assert len(committed) == 3
    result = evaluate(spec, output, committed)

    fake = _written_images(spec.output.path)
    real = torch.from_numpy(
        np.stack([np.asarray(Image.open(path)) for path in sorted(reference_dir.iterdir())])
    ).permute(0, 3, 1, 2)
    features = _Features(FeatureModel(spec.evaluation, "cpu"))

    # The shards' merged sums are those of one pass over every written image.
    one_pass = FeatureSums.empty(features.num_features)
    one_pass.add(features(fake).numpy())
    merged = merged_feature_sums(output, list(committed))[JOB_WIDE]
    assert merged.count == one_pass.count == ROWS
    for got, want in zip(merged.mean_cov(), one_pass.mean_cov(), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)

    fid = FrechetInceptionDistance(feature=features)
    kid = KernelInceptionDistance(feature=features, subsets=1, subset_size=ROWS)
    for metric in (fid, kid):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    want_fid = float(fid.compute())
    want_kid = float(kid.compute()[0])
    assert result["fid"]["all"] == pytest.approx(want_fid, rel=1e-3)
    assert result["kid"] == pytest.approx(want_kid, rel=1e-3)
    assert want_kid > 0.01  # generated and real images differ: the comparison is not of zeros
    assert result["inception_score"] is None  # a CLIP tower has no classifier head
    assert result["images"] == ROWS
    # The reference was embedded once and cached in the output.
    assert (Path(spec.output.path) / "_reference_features.parquet").is_file()


def test_near_duplicates_are_the_planted_ones(tmp_path, tiny_model, tiny_clip):
    """Rows 3/17 and 5/11/20 share a seed and a prompt (under different ids, in different shards): they
    are marked, grouped together, and nothing else is."""
    prompts = [f"a {colour} thing {i}" for i, colour in enumerate(["blue", "green", "red"] * 8)]
    seeds = list(range(100, 100 + ROWS))
    for copy, original in ((17, 3), (11, 5), (20, 5)):
        prompts[copy], seeds[copy] = prompts[original], seeds[original]
    inputs = _prompts(tmp_path, prompts, seeds)
    spec = _spec(
        inputs, tmp_path / "out", tiny_model, {"source": tiny_clip, "duplicate_threshold": 0.999}
    )
    committed = _run_shards(spec, actors=1)
    result = evaluate(spec, OutputLayout(spec.output.path), committed)["near_duplicates"]
    table = pq.read_table(Path(spec.output.path) / "duplicates.parquet").to_pylist()
    groups = {}
    for row in table:
        groups.setdefault(row["group"], set()).add(row["id"])
    assert sorted(groups.values(), key=min) == [{"row-003", "row-017"}, {"row-005", "row-011", "row-020"}]
    assert (result["images"], result["groups"]) == (5, 2)
