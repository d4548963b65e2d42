"""Every ready spec in jobs/ runs, as a user would run it (only the model and sizes made small);
jobs/augment.yaml runs in tests/test_augmentation.py, as docs/augmentation.md runs it."""

from __future__ import annotations

from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import check_output, read_metadata, run_cli
from PIL import Image

import imagemill

REPO = Path(__file__).resolve().parents[1]
FAST = ["--set", "generation.num_inference_steps=1", "--no-progress"]


def test_every_spec_in_jobs_is_valid():
    """Every YAML file in jobs/ is a valid job spec, or (named *_recipe.yaml) a valid dataset recipe."""
    from imagemill.prompts.recipes import load_recipe

    files = sorted((REPO / "jobs").glob("*.yaml"))
    shipped = {"demo.yaml", "augment.yaml", "nightly.yaml", "augment_img2img.yaml", "augment_recipe.yaml"}
    shipped |= {"inpaint.yaml"}
    assert {path.name for path in files} >= shipped
    for path in files:
        if path.name.endswith("_recipe.yaml"):
            load_recipe(str(path))
        else:
            imagemill.load_spec(path)


def test_demo_job(ray_address, tmp_path):
    """As the README's first command runs it, with the demo model shipped in jobs/models (only fewer steps,
    and one worker: its two run in test_cluster_jobs.py, submitted as is)."""
    done = run_cli(
        "run", "jobs/demo.yaml", "--output", str(tmp_path / "demo"), *FAST, "--num-workers", "1",
        ray_address=ray_address, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    check_output(str(tmp_path / "demo"), {f"demo-{i:03d}" for i in range(64)}, 32, 32)


def test_image_to_image_job_redraws_the_shipped_sources(ray_address, tmp_path):
    """As docs/image-to-image.md runs it: the shipped sources (jobs/img2img) and the demo model (fewer
    steps)."""
    output = tmp_path / "augment_img2img"
    done = run_cli(
        "run", "jobs/augment_img2img.yaml", "--output", str(output), *FAST,
        "--set", "generation.num_inference_steps=2",  # 1 x a strength under 1 runs no step: refused
        ray_address=ray_address, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    sources = sorted(path.stem for path in (REPO / "jobs" / "img2img" / "images").glob("*.png"))
    assert len(sources) == 6
    check_output(str(output), {f"{name}_{k}" for name in sources for k in range(4)}, 32, 32)
    rows = read_metadata(str(output)).to_pylist()
    assert all(0.5 <= row["strength"] <= 0.9 and row["ssim"] is not None for row in rows)
    assert {row["source_image"] for row in rows} == {f"images/{name}.png" for name in sources}


def test_inpainting_job_completes_the_shipped_masked_sources(ray_address, tmp_path):
    """As docs/image-to-image.md runs it: the shipped sources and masks (jobs/inpaint), the demo model
    (one step: strength 1 runs it); outside every mask the source's pixels."""
    output = tmp_path / "inpaint"
    done = run_cli(
        "run", "jobs/inpaint.yaml", "--output", str(output), *FAST, ray_address=ray_address, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    sources = sorted(path.stem for path in (REPO / "jobs" / "inpaint" / "images").glob("*.png"))
    assert len(sources) == 45
    check_output(str(output), set(sources), 32, 32)
    rows = read_metadata(str(output)).to_pylist()
    assert all(row["psnr"] == 100.0 and row["mask_image"] == f"masks/{row['id']}.png" for row in rows)
    assert {row["shape"] for row in rows} == {"circle", "square", "triangle"}  # carried


@pytest.fixture
def nightly_bucket(s3_endpoint, tiny_model, tiny_clip, tmp_path):
    """The bucket that jobs/nightly.yaml names, on the S3 endpoint, with a model and a safety checker
    (one that flags nothing: a cosine never exceeds 1) in it."""
    from imagemill.testing.tiny_safety import make_tiny_safety_checker

    fs = fsspec.filesystem("s3")
    fs.mkdir("imagemill-nightly")
    fs.put(tiny_model, "imagemill-nightly/models/pipeline", recursive=True)
    checker = make_tiny_safety_checker(tmp_path / "checker", tiny_clip, threshold=1.0)
    fs.put(str(checker), "imagemill-nightly/models/safety-checker", recursive=True)
    yield fs
    fs.rm("imagemill-nightly", recursive=True)


def _drop_prompts(fs, day: str, name: str, ids: list[str]) -> None:
    with fs.open(f"imagemill-nightly/prompts/{day}/{name}.parquet", "wb") as f:
        pq.write_table(pa.table({"id": ids, "prompt": [f"a photo of {i}" for i in ids]}), f)


def test_nightly_job_writes_each_night_to_its_own_prefix_and_only_new_input_is_new_work(
    ray_address, nightly_bucket
):
    fs = nightly_bucket
    _drop_prompts(fs, "2026-11-23", "drop", ["mon-1", "mon-2"])
    _drop_prompts(fs, "2026-11-24", "drop", ["tue-1", "tue-2", "tue-3"])
    small = ["--set", "model.dtype=float32", "--set", "generation.width=32", "--set", "generation.height=32"]
    small += ["--num-workers", "1"]

    def night(day: str):
        done = run_cli(
            "run", "jobs/nightly.yaml", "--date", day, *small, *FAST, ray_address=ray_address, cwd=REPO
        )
        assert done.returncode == 0, done.stderr
        return done

    night("2026-11-23")
    night("2026-11-24")
    check_output("s3://imagemill-nightly/images/2026-11-23", {"mon-1", "mon-2"}, 32, 32)
    check_output("s3://imagemill-nightly/images/2026-11-24", {"tue-1", "tue-2", "tue-3"}, 32, 32)
    assert "(0 run now)" in night("2026-11-24").stdout

    _drop_prompts(fs, "2026-11-24", "late", ["tue-4"])
    assert "4 rows: 4 ok, 0 error in 2/2 shards (1 run now)" in night("2026-11-24").stdout
    record = fs.cat_file("imagemill-nightly/images/2026-11-24/_job.json").decode()
    assert '"name": "nightly-2026-11-24"' in record
    # publishable: every row checked by the safety filter, every file carrying its parameters
    rows = read_metadata("s3://imagemill-nightly/images/2026-11-24").to_pylist()
    assert all(row["safety_score"] is not None and row["status"] == "ok" for row in rows)
    with fs.open(f"imagemill-nightly/images/2026-11-24/{rows[0]['path']}", "rb") as image_file:
        xmp = Image.open(image_file).info.get("xmp", b"")
    assert b"trainedAlgorithmicMedia" in (xmp if isinstance(xmp, bytes) else xmp.encode())
