"""Enhance-only (`model.kind: none`, issue #25 acceptance 2): a folder of input images with no prompts
becomes upscaled images with metadata; each row's source image is its draw, the stages after
generation run on it, and every bad source is an `invalid_image` row while the rest are done."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import read_metadata
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import imagemill
from imagemill.core.errors import ImagemillError
from imagemill.core.spec import load_spec
from imagemill.testing.in_process import run_in_process
from imagemill.workers.loading import Pretrained

SIZE = 16
ROOT = Path(__file__).resolve().parent.parent


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _spec(folder: Path, output: Path, **sections) -> imagemill.JobSpec:
    return imagemill.build_spec(
        {
            "input": {
                "path": str(folder),
                "image_column": "image",
                "prompt_column": None,
                "max_image_pixels": 400,
            }
            | sections.pop("input", {}),
            "output": {"path": str(output)},
            "model": {"kind": "none"},
            "generation": {"width": SIZE, "height": SIZE},
            "workers": {"batch_size": 4},
            **sections,
        }
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """A folder of images listed by a Parquet file of paths (no prompt, no id), good and hostile."""
    root = tmp_path_factory.mktemp("enhance")
    images = root / "in" / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    good = {f"good-{i}.png": rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for i in range(3)}
    for name, pixels in good.items():
        (images / name).write_bytes(_png(pixels))
    (images / "truncated.png").write_bytes(_png(good["good-0.png"])[:100])
    (images / "disguised.png").write_bytes(b"<html><script>alert(1)</script></html>")  # not a PNG
    (images / "too-big.png").write_bytes(_png(np.zeros((21, 20, 3), np.uint8)))  # 420 > 400 pixels
    (root / "outside.png").write_bytes(_png(good["good-1.png"]))
    (images / "link-out.png").symlink_to(root / "outside.png")
    names = [*good, "truncated.png", "disguised.png", "too-big.png", "link-out.png"]
    pq.write_table(pa.table({"image": [f"images/{name}" for name in names]}), root / "in" / "list.parquet")
    return root, good


BAD = {
    "truncated.png": "does not decode|not an image",
    "disguised.png": "not an image",
    "too-big.png": "max_image_pixels",
    "link-out.png": "leaves the input file's folder",
}


@pytest.mark.model
def test_a_folder_without_prompts_becomes_upscaled_images_and_bad_sources_invalid_image_rows(
    folder, tmp_path
):
    from imagemill.testing.tiny_upscaler import make_tiny_upscaler
    from imagemill.workers.stages.upscale import SpandrelUpscaler

    root, good = folder
    network = str(make_tiny_upscaler(tmp_path / "x2", 2))
    spec = _spec(root / "in", tmp_path / "out", upscale={"source": network, "tile": None})
    result = run_in_process(spec)
    assert (result.ok, result.errors_by_reason) == (len(good), {"invalid_image": len(BAD)})
    rows = {
        row["source_image"].removeprefix("images/"): row
        for row in read_metadata(spec.output.path).to_pylist()
    }
    upscaler = SpandrelUpscaler(Pretrained(network, "upscale.source"), "float32", None, 0, "cpu")
    for name, pixels in good.items():
        row = rows[name]
        assert row["status"] == "ok" and row["prompt"] is None
        assert (row["upscaler"], row["upscale_scale"]) == (network, 2)
        written = np.asarray(Image.open(Path(spec.output.path) / row["path"]).convert("RGB"))
        expected = upscaler(torch.from_numpy(pixels[None].copy()), [""], [0])[0].numpy()
        assert np.array_equal(written, expected), name  # the source itself, upscaled: nothing drawn
    for name, detail in BAD.items():
        assert rows[name]["status"] == "error" and rows[name]["path"] is None
        assert rows[name]["error"].startswith("invalid_image: ")
        assert re.search(detail, rows[name]["error"]), rows[name]["error"]


def test_kind_none_needs_sources_and_only_it_goes_without_prompts(tmp_path):
    base = {"input": {"path": str(tmp_path)}, "output": {"path": str(tmp_path / "o")}}
    with pytest.raises(
        ImagemillError, match="model.kind: none draws each row's source image: set input.image_column"
    ):
        imagemill.build_spec(base | {"model": {"kind": "none"}})
    with pytest.raises(
        ImagemillError, match=r"input.prompt_column: null \(no prompts\) needs model.kind: none"
    ):
        imagemill.build_spec(
            base | {"input": {"path": str(tmp_path), "prompt_column": None}, "model": {"source": "m"}}
        )
    sources = {"path": str(tmp_path), "image_column": "image", "prompt_column": None}
    with pytest.raises(ImagemillError, match="scoring read each row's prompt: set input.prompt_column"):
        imagemill.build_spec(base | {"input": sources, "model": {"kind": "none"}, "scoring": {"source": "c"}})
    with pytest.raises(
        ImagemillError, match="input.image_column needs model.kind: diffusers, none, not noop"
    ):
        imagemill.build_spec(
            base | {"input": {"path": str(tmp_path), "image_column": "image"}, "model": {"kind": "noop"}}
        )


@pytest.mark.model
def test_the_shipped_enhance_job_upscales_the_shipped_sources(tmp_path):
    """`imagemill run jobs/enhance.yaml` (docs/upscale.md), its spec as the command loads it, run in
    this process: the six shipped sources, each upscaled x2."""
    spec = load_spec(ROOT / "jobs" / "enhance.yaml", [("output.path", str(tmp_path / "enhance"))])
    result = run_in_process(spec)
    assert (result.ok, result.errors) == (6, 0)
    rows = read_metadata(spec.output.path).to_pylist()
    sources = sorted(path.name for path in (ROOT / "jobs" / "img2img" / "images").glob("*.png"))
    assert sorted(row["source_image"] for row in rows) == sources  # a folder's path: the image's there
    for row in rows:
        assert Image.open(Path(spec.output.path) / row["path"]).size == (64, 64)


def test_the_shipped_upscaler_is_the_tiny_builders(tmp_path):
    """jobs/models/tiny-upscaler-x2 is what imagemill.testing.tiny_upscaler writes (nothing else)."""
    from imagemill.testing.tiny_upscaler import make_tiny_upscaler

    written = make_tiny_upscaler(tmp_path / "x2", 2) / "model.safetensors"
    shipped = ROOT / "jobs" / "models" / "tiny-upscaler-x2" / "model.safetensors"
    assert written.read_bytes() == shipped.read_bytes()


# generation.resize: keep — photos of any size, each upscaled at its own size and aspect (issue #25).
# (width, height) by name: odd sizes, a 1x1, a 10000x1 strip, two of one size (one batch).
KEPT = {"a.png": (17, 9), "b.png": (17, 9), "c.png": (32, 32), "d.png": (64, 48), "e.png": (1, 1)}
KEPT |= {"strip.png": (10000, 1)}


@pytest.mark.model
def test_kept_sizes_upscale_each_image_at_its_own_size_batched_as_alone_and_resume_byte_identical(tmp_path):
    """Each output is exactly 2x its own source, equal to the upscaler (tiled: 16 px tiles, odd edges)
    run on that image alone; the metadata's width/height are the source's; a resumed run (one shard's
    commit lost) writes the same bytes."""
    from imagemill.testing.in_process import output_hashes
    from imagemill.testing.tiny_upscaler import make_tiny_upscaler
    from imagemill.workers.stages.upscale import SpandrelUpscaler

    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(1)
    sources = {name: rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for name, (w, h) in KEPT.items()}
    for name, pixels in sources.items():
        (folder / name).write_bytes(_png(pixels))
    network = str(make_tiny_upscaler(tmp_path / "x2", 2))
    output = tmp_path / "out"
    spec = imagemill.build_spec(
        {
            "input": {"path": str(folder), "format": "images", "rows_per_shard": 3},
            "output": {"path": str(output)},
            "model": {"kind": "none"},
            "generation": {"resize": "keep"},
            "upscale": {"source": network, "tile": 16, "tile_overlap": 4},
            "workers": {"batch_size": 4},
        }
    )
    result = run_in_process(spec)
    assert (result.ok, result.errors) == (len(KEPT), 0)
    upscaler = SpandrelUpscaler(Pretrained(network, "upscale.source"), "float32", 16, 4, "cpu")
    rows = {row["source_image"]: row for row in read_metadata(str(output)).to_pylist()}
    for name, pixels in sources.items():
        row = rows[name]
        assert (row["width"], row["height"], row["upscale_scale"]) == (*KEPT[name], 2)
        written = np.asarray(Image.open(output / row["path"]).convert("RGB"))
        alone = upscaler(torch.from_numpy(pixels[None].copy()), [""], [0])[0].numpy()
        assert written.shape == (2 * pixels.shape[0], 2 * pixels.shape[1], 3), name
        assert np.array_equal(written, alone), name
        assert (row["ssim"] is None) == (min(KEPT[name]) <= 5), name  # SSIM's window needs 6 px a side

    before = output_hashes(output)
    lost = sorted((output / "shards").glob("*.json"))[0]
    lost.unlink()  # the run died before this shard's commit: a resume redoes it alone
    again = run_in_process(spec)
    assert (again.shards_run, again.ok) == (1, len(KEPT))
    assert output_hashes(output) == before


def test_kept_sizes_are_refused_where_a_model_draws(tmp_path):
    """A model draws one size per batch, a multiple of 8: `keep` is enhance-only, said in one line."""
    sources = {"path": str(tmp_path / "in.parquet"), "image_column": "image"}
    with pytest.raises(
        ImagemillError,
        match=r"generation.resize: keep \(each source at its own size\) needs model.kind: "
        r"none, not diffusers: .*use center_crop, pad or stretch$",
    ):
        imagemill.build_spec(
            {
                "input": sources,
                "output": {"path": str(tmp_path / "o")},
                "model": {"source": "m"},
                "generation": {"resize": "keep"},
            }
        )


@pytest.mark.model
def test_a_kept_size_the_output_cannot_write_is_a_model_rejected_row_and_the_rest_are_written(tmp_path):
    """The job's size rules, checked on the spec's width/height, hold for each kept size once upscaled:
    a 1x1 photo is too small for the watermark, a 9000x1 strip x2 too wide for WebP; their rows are
    `model_rejected`, naming the setting, and the shard's other photo is written."""
    from imagemill.testing.tiny_upscaler import make_tiny_upscaler

    folder = tmp_path / "photos"
    folder.mkdir()
    for name, (width, height) in {"tiny.png": (1, 1), "strip.png": (9000, 1), "ok.png": (130, 128)}.items():
        (folder / name).write_bytes(_png(np.full((height, width, 3), 90, np.uint8)))
    network = str(make_tiny_upscaler(tmp_path / "x2", 2))
    spec = imagemill.build_spec(
        {
            "input": {"path": str(folder), "format": "images"},
            "output": {"path": str(tmp_path / "out"), "image_format": "webp", "watermark": {"payload": "w"}},
            "model": {"kind": "none"},
            "generation": {"resize": "keep"},
            "upscale": {"source": network, "tile": None},
        }
    )
    result = run_in_process(spec)
    assert (result.ok, result.errors_by_reason) == (1, {"model_rejected": 2})
    rows = {row["source_image"]: row for row in read_metadata(spec.output.path).to_pylist()}
    assert Image.open(Path(spec.output.path) / rows["ok.png"]["path"]).size == (260, 256)
    assert rows["tiny.png"]["error"] == (
        "model_rejected: output.watermark needs images of at least 65536 pixels (256x256), got 2x2"
    )
    assert rows["strip.png"]["error"] == (
        "model_rejected: a 18000x2 image is over webp's 16383 px a side; set output.image_format: png, "
        "or a smaller upscale"
    )


@settings(max_examples=15, deadline=None)
@given(sizes=st.lists(st.tuples(st.integers(1, 24), st.integers(1, 24)), min_size=1, max_size=6))
def test_kept_sources_give_their_rows_their_size_and_batches_hold_one_size(tmp_path_factory, sizes):
    """Each row takes its source's own size and pixels (any size, before batching), and make_batches
    cuts batches of one size each: images of one size together, in shard order."""
    from imagemill.workers.rows import Row, make_batches
    from imagemill.workers.source_images import load_sources

    folder = tmp_path_factory.mktemp("kept")
    rng = np.random.default_rng(len(sizes))
    sources = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for w, h in sizes]
    for index, pixels in enumerate(sources):
        (folder / f"{index}.png").write_bytes(_png(pixels))
    kept = {"width": SIZE, "height": SIZE, "resize": "keep"}
    spec = _spec(folder, folder / "out", input={"max_image_pixels": 24 * 24}, generation=kept)
    rows = [
        Row(i, i, str(i), None, None, 0, SIZE, SIZE, 1, 0.0, source=f"{i}.png") for i in range(len(sizes))
    ]
    load_sources(rows, str(folder / "list.parquet"), spec.input, spec.generation, None)
    for row, pixels, (width, height) in zip(rows, sources, sizes, strict=True):
        assert row.error is None and (row.width, row.height) == (width, height)
        assert np.array_equal(row.source_pixels, pixels)
    batches = make_batches(rows, 2)
    for batch in batches:
        assert len({(row.width, row.height) for row in batch}) == 1
        assert [row.index for row in batch] == sorted(row.index for row in batch)
    per_size = {size: sizes.count(size) for size in sizes}
    assert len(batches) == sum(-(-count // 2) for count in per_size.values())
