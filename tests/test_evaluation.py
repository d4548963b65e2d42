"""Dataset evaluation (`evaluation:`): features on the actors, mergeable statistics, FID/KID against a
reference (compared with torchmetrics on the same images and feature model), near-duplicates.

The shards run in-process (two `ShardWorker`s standing for two actors, no Ray): what is under test is
what they write and what the driver's post-pass makes of it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import make_bucket, merged_feature_sums, read_metadata, write_prompt_files
from PIL import Image

import imagemill
from imagemill.core.evaluation_results import EvaluationResults
from imagemill.core.features import JOB_WIDE, FeatureSums
from imagemill.core.layout import DUPLICATES, REFERENCE_FEATURES, OutputLayout
from imagemill.core.write_gate import OwnedOutput
from imagemill.evaluation.embedding_passes import read_shard_embeddings
from imagemill.evaluation.post_pass import evaluate
from imagemill.planning.shards import plan_shards
from imagemill.workers.stages.evaluation import FeatureModel
from imagemill.workers.worker import ShardWorker

SIZE = 32
ROWS = 24  # three shards of 8; as many reference images, so KID's sample is all of both sides


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory) -> Path:
    """24 'real' images: the demo world's drawn shapes."""
    from imagemill.demo.shapes import draw, scenes

    folder = tmp_path_factory.mktemp("reference")
    rng = np.random.default_rng(0)
    for index, scene in enumerate(scenes(held_out=False)[:ROWS]):
        Image.fromarray(draw(scene, rng)).save(folder / f"real-{index:02d}.png")
    return folder


def _prompts(
    folder: Path, prompts: list[str], seeds: list[int] | None = None, labels: list[str] | None = None
) -> Path:
    import pyarrow as pa

    columns = {"id": [f"row-{i:03d}" for i in range(len(prompts))], "prompt": prompts}
    if seeds is not None:
        columns["seed"] = seeds
    if labels is not None:
        columns["label"] = labels
    pq.write_table(pa.table(columns), folder / "prompts.parquet", row_group_size=8)
    return folder


def _spec(
    inputs: Path | str,
    output: Path | str,
    model: str,
    evaluation: dict,
    carry_columns: list[str] | None = None,
    **output_extra,
) -> imagemill.JobSpec:
    return imagemill.build_spec(
        {
            "name": "evaluation",
            "input": {"path": str(inputs), "rows_per_shard": 8, "carry_columns": carry_columns or []},
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
    paths = [Path(output) / row["path"] for row in rows if row["path"]]
    pixels = [np.asarray(Image.open(path).convert("RGB")) for path in paths]
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2)


class _Features(torch.nn.Module):
    """The job's feature model as torchmetrics takes a custom one: (N, 3, H, W) uint8 → (N, d)."""

    def __init__(self, model: FeatureModel):
        super().__init__()
        self.model = model
        self.num_features = model.dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.model.embed(images.permute(0, 2, 3, 1)))


PLANTED = ((17, 3), (11, 5), (20, 5))  # (copy, original): the same seed and prompt under another id


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_model, tiny_clip, reference_dir) -> tuple[imagemill.JobSpec, dict, dict]:
    """24 rows in three shards over two in-process actors, with duplicates planted across shards; the
    spec, the committed shards' stats and the post-pass's result."""
    folder = tmp_path_factory.mktemp("job")
    colours = ["blue", "green", "red"] * 8
    prompts = [f"a {colour} thing {i}" for i, colour in enumerate(colours)]
    seeds = list(range(100, 100 + ROWS))
    for copy, original in PLANTED:
        prompts[copy], seeds[copy] = prompts[original], seeds[original]
    evaluation = {"source": tiny_clip, "reference": str(reference_dir), "duplicate_threshold": 0.999}
    inputs = _prompts(folder, prompts, seeds, colours)
    spec = _spec(inputs, folder / "out", tiny_model, evaluation, carry_columns=["label"])
    committed = _run_shards(spec)
    assert len(committed) == 3
    return spec, committed, evaluate(spec, OwnedOutput.unleased(OutputLayout(spec.output.path)), committed)


def test_fid_and_kid_match_torchmetrics_and_shard_sums_merge_exactly(job, reference_dir):
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    spec, committed, result = job
    output = OutputLayout(spec.output.path)
    fake = _written_images(spec.output.path)
    real = torch.from_numpy(
        np.stack([np.asarray(Image.open(path)) for path in sorted(reference_dir.iterdir())])
    ).permute(0, 3, 1, 2)
    features = _Features(FeatureModel(spec.evaluation, "cpu"))

    # The shards' merged sums are those of one pass over every written image.
    one_pass = FeatureSums.empty(features.num_features)
    one_pass.add(features(fake).numpy())
    merged = merged_feature_sums(output, committed)
    assert merged[JOB_WIDE].count == one_pass.count == ROWS
    for got, want in zip(merged[JOB_WIDE].mean_cov(), one_pass.mean_cov(), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    # Per label too: the label column (colour) cycles, so every shard holds every label.
    colours = [
        row["label"] for row in sorted(read_metadata(spec.output.path).to_pylist(), key=lambda r: r["id"])
    ]
    for colour in ("blue", "green", "red"):
        label_pass = FeatureSums.empty(features.num_features)
        label_pass.add(features(fake[[c == colour for c in colours]]).numpy())
        assert merged[colour].count == label_pass.count == ROWS // 3
        np.testing.assert_allclose(merged[colour].sum, label_pass.sum, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(merged[colour].outer, label_pass.outer, rtol=1e-5, atol=1e-6)
    assert set(result.fid.per_label) == set(result.kid.per_label) == {"blue", "green", "red"}
    assert set(result.diversity.per_label) == {"blue", "green", "red"}

    fid = FrechetInceptionDistance(feature=features)
    kid = KernelInceptionDistance(feature=features, subsets=1, subset_size=ROWS)
    for metric in (fid, kid):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    want_fid = float(fid.compute())
    want_kid = float(kid.compute()[0])
    assert result.fid.all == pytest.approx(want_fid, rel=1e-3)
    assert result.kid.all == pytest.approx(want_kid, rel=1e-3)
    assert want_kid > 0.01  # generated and real images differ: the comparison is not of zeros
    assert result.inception_score is None  # a CLIP tower has no classifier head
    assert result.images == ROWS
    # The reference was embedded once and cached in the output.
    assert (Path(spec.output.path) / "_reference_features.parquet").is_file()


def test_near_duplicates_are_the_planted_ones(job):
    """Rows 3/17 and 5/11/20 share a seed and a prompt (under other ids, in other shards): they are
    marked and grouped together, and nothing else is."""
    spec, committed, result = job
    table = pq.read_table(Path(spec.output.path) / "duplicates.parquet").to_pylist()
    groups: dict[int, set[str]] = {}
    for row in table:
        groups.setdefault(row["group"], set()).add(row["id"])
    assert sorted(groups.values(), key=min) == [{"row-003", "row-017"}, {"row-005", "row-011", "row-020"}]
    assert (result.near_duplicates.images, result.near_duplicates.groups) == (5, 2)


@pytest.mark.parametrize("output_format", ["files", "webdataset", "parquet"])
def test_every_format_gets_embeddings_of_its_written_rows_and_overwrite_deletes_them(
    tmp_path, tiny_clip, output_format
):
    """Features are taken before the writer, so each format's shards have their embeddings (the
    no-model generator keeps this cheap); a shard's deletion (--overwrite, --redo-changed) takes them."""
    from imagemill.output.claim import delete_shards

    inputs = _prompts(tmp_path, [f"prompt {i}" if i != 4 else " " for i in range(12)])
    spec = _spec(inputs, tmp_path / "out", "unused", {"source": tiny_clip}, format=output_format)
    spec.model.kind = "noop"
    committed = _run_shards(spec, actors=1)
    output = OutputLayout(spec.output.path)
    ok_ids = {row["id"] for row in read_metadata(spec.output.path).to_pylist() if row["status"] == "ok"}
    assert len(ok_ids) == 11  # the blank prompt is an error row: no image, no embedding
    embedded = [ids for _, ids, _, _ in read_shard_embeddings(output, sorted(committed))]
    assert sorted(id_ for ids in embedded for id_ in ids) == sorted(ok_ids)
    assert merged_feature_sums(output, committed)[JOB_WIDE].count == 11

    delete_shards(OwnedOutput.unleased(output), sorted(committed), set(committed))
    for folder in ("embeddings", "feature_stats"):
        assert not list((Path(spec.output.path) / folder).iterdir())


def test_a_job_on_s3_reports_its_dataset_and_a_rerun_reuses_the_post_pass(
    ray_session, tmp_path, tiny_model, tiny_clip, reference_dir
):
    """Through Ray, on S3, in the webdataset format: `_job.json` and the report carry the dataset's
    numbers, every shard has its embeddings, and running the finished job again reuses the
    near-duplicates file and the reference's cached features instead of recomputing them."""
    import s3fs

    bucket = make_bucket("evaluation-e2e")
    write_prompt_files(f"{bucket}/prompts", n_files=1, rows_per_file=12, row_group_size=4)
    evaluation = {"source": tiny_clip, "reference": str(reference_dir)}
    spec = _spec(f"{bucket}/prompts", f"{bucket}/out", tiny_model, evaluation, format="webdataset")
    spec.workers.num_workers = 2
    assert imagemill.run(spec, progress=False).ok == 12
    fs = s3fs.S3FileSystem()
    out = spec.output.path.removeprefix("s3://")
    record = EvaluationResults.model_validate(json.loads(fs.cat_file(f"{out}/_job.json"))["evaluation"])
    assert record.images == 12 and record.fid.all > 0 and record.kid.all is not None
    assert 0 < record.diversity.all <= 2
    assert (
        EvaluationResults.model_validate(json.loads(fs.cat_file(f"{out}/report.json"))["dataset"]) == record
    )
    assert 'id="dataset"' in fs.cat_file(f"{out}/report.html").decode()
    fs.invalidate_cache()
    shards = len(fs.ls(f"{out}/shards"))
    assert shards == 2 and len(fs.ls(f"{out}/embeddings")) == len(fs.ls(f"{out}/feature_stats")) == shards
    made = {name: fs.info(f"{out}/{name}")["LastModified"] for name in (DUPLICATES, REFERENCE_FEATURES)}

    assert imagemill.run(spec, progress=False).shards_run == 0
    fs.invalidate_cache()
    assert (
        EvaluationResults.model_validate(json.loads(fs.cat_file(f"{out}/_job.json"))["evaluation"]) == record
    )
    assert {name: fs.info(f"{out}/{name}")["LastModified"] for name in made} == made
