"""Inpainting (input.mask_column): masks read and decoded as sources are, one rule for every mode, a mask
of another size a one-line row error; outside the mask the source's pixels are kept exactly (the demo
VAE's round trip would change them), inside the prompt's drawing; SSIM/PSNR measured outside the mask."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import read_metadata
from doc_pages import command
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from imagemill.core.errors import ImagemillError
from imagemill.core.images import InvalidImage
from imagemill.core.spec import GenerationSpec, build_spec
from imagemill.demo.shapes import BACKGROUNDS, Scene, caption, draw
from imagemill.demo.sources import shape_box_mask
from imagemill.planning.shards import plan_shards
from imagemill.workers.image_similarity import similarity
from imagemill.workers.masks import check_size, mask_values, shape_mask
from imagemill.workers.worker import ShardWorker

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = str(REPO / "jobs" / "models" / "demo-shapes")


def _png(image: Image.Image | np.ndarray) -> bytes:
    image = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _spec(input_path: str, output: str, **generation) -> object:
    return build_spec(
        {
            "input": {
                "path": input_path,
                "image_column": "image",
                "mask_column": "mask",
                "rows_per_shard": 64,
            },
            "output": {"path": output},
            "model": {"source": DEMO_MODEL, "device": "cpu"},
            "generation": {"width": 32, "height": 32, "num_inference_steps": 10, "guidance_scale": 3.0}
            | {"strength": 1.0}
            | generation,
            "workers": {"batch_size": 8},
        }
    )


def test_every_mask_mode_is_read_by_one_rule_white_repaints_black_or_transparent_keeps():
    left_white = np.zeros((4, 4), np.uint8)
    left_white[:, :2] = 255
    expected = np.where(left_white > 0, 255, 0)
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = 255  # white everywhere, but the right half transparent: kept
    rgba[:, :2, 3] = 255
    palette = Image.fromarray(left_white).convert("P")
    palette.info["transparency"] = int(np.asarray(palette)[0, 0])  # the white entry transparent
    grey_jpeg_like = np.where(left_white > 0, 200, 60).astype(np.uint8)  # not pure: cut at half
    masks = {
        "L": Image.fromarray(left_white),
        "1": Image.fromarray(left_white).convert("1"),
        "RGB": Image.fromarray(left_white).convert("RGB"),
        "RGBA": Image.fromarray(rgba, mode="RGBA"),
        "LA": Image.fromarray(left_white).convert("LA"),
        "grey": Image.fromarray(grey_jpeg_like),
    }
    for name, image in masks.items():
        assert np.array_equal(np.asarray(mask_values(_png(image), 10_000)), expected), name
    # a transparent palette entry keeps, like a transparent pixel
    assert not np.asarray(mask_values(_png(palette), 10_000)).any()
    sixteen_bit = _png(Image.fromarray(np.full((4, 4), 40000, np.uint16)))
    with pytest.raises(InvalidImage, match="16-bit"):
        mask_values(sixteen_bit, 10_000)
    with pytest.raises(InvalidImage, match="not an image"):
        mask_values(b"white means repaint", 10_000)


def test_a_mask_of_another_size_than_its_source_is_refused_in_one_line():
    with pytest.raises(InvalidImage) as refused:
        check_size(Image.new("L", (40, 32)), Image.new("RGB", (32, 32)))
    assert str(refused.value) == (
        "the mask is 40x32 but its source is 32x32; draw the mask at the source's size"
    )
    check_size(Image.new("L", (32, 32)), Image.new("RGB", (32, 32)))


@settings(max_examples=25, deadline=None)
@given(arrays(np.bool_, (12, 10)), st.integers(0, 4))
def test_a_grown_mask_holds_the_mask_and_only_pixels_within_the_grow(mask, grow):
    fitted = np.where(mask, 255, 0).astype(np.uint8)
    grown = shape_mask(fitted, GenerationSpec(mask_grow=grow)) > 0
    assert (grown | ~mask).all()  # every masked pixel still repaints
    for y, x in zip(*np.nonzero(grown), strict=True):  # and each repainted one is within `grow` of one
        window = mask[max(y - grow, 0) : y + grow + 1, max(x - grow, 0) : x + grow + 1]
        assert window.any()
    blurred = shape_mask(fitted, GenerationSpec(mask_grow=grow, mask_blur=1))
    assert (blurred[~grown] < 255).all() and (blurred[grown] > 0).all()  # it fades across the edge only


def test_mask_settings_are_checked_and_fingerprinted(tmp_path):
    with pytest.raises(ImagemillError, match=r"mask_column masks the source images: set input.image_column"):
        build_spec({"input": {"path": "p.parquet", "mask_column": "mask"}, "output": {"path": "o"},
                    "model": {"source": DEMO_MODEL}})  # fmt: skip
    with pytest.raises(ImagemillError, match=r"generation.mask_grow"):
        _spec("p.parquet", "o", mask_grow=-1)
    settings_ = ({}, {"mask_grow": 2}, {"mask_blur": 2})
    fingerprints = {json.dumps(_spec("p.parquet", "o", **g).fingerprint(), sort_keys=True) for g in settings_}
    assert len(fingerprints) == 3


def test_similarity_outside_the_mask_sees_only_what_must_not_change():
    generator = torch.Generator().manual_seed(0)
    source = torch.randint(0, 256, (2, 16, 16, 3), generator=generator, dtype=torch.uint8)
    keep = torch.ones(2, 16, 16, dtype=torch.bool)
    keep[:, 4:12, 4:12] = False
    changed = source.clone()
    changed[:, 4:12, 4:12] = 255 - changed[:, 4:12, 4:12]  # only inside the mask
    (ssim_kept, psnr_kept), _ = similarity(source, changed, keep)
    assert psnr_kept == 100.0 and 0 < ssim_kept < 1  # SSIM's windows read across the edge
    assert similarity(source, changed)[0][1] < 20  # over the whole image, the change shows
    changed[0, 0, 0] = 255 - changed[0, 0, 0]  # one pixel outside
    assert similarity(source, changed, keep)[0][1] < 100.0
    assert similarity(source, changed, torch.zeros_like(keep)) == [None, None]  # nothing kept


@pytest.fixture(scope="module")
def inpainted(tmp_path_factory) -> tuple[Path, Path, dict[str, dict]]:
    """One shard on the demo model: shapes masked and completed (paths and bytes), and bad masks."""
    root = tmp_path_factory.mktemp("inpaint")
    folder = root / "inputs"
    (folder / "images").mkdir(parents=True)
    scene = Scene("red", "circle", "left", "white")
    source = draw(scene, np.random.default_rng(0))
    mask = shape_box_mask(source, BACKGROUNDS[scene.background])
    (folder / "images" / "source.png").write_bytes(_png(source))
    (folder / "images" / "mask.png").write_bytes(_png(mask))
    (root / "outside.png").write_bytes(_png(mask))
    (folder / "images" / "escape.png").symlink_to(root / "outside.png")
    os.mkfifo(folder / "images" / "pipe.png")
    cmyk = io.BytesIO()
    Image.new("CMYK", (32, 32)).save(cmyk, format="JPEG")
    wide = np.zeros((32, 40), np.uint8)
    asked = caption(Scene("blue", "square", "left", "white"))
    rows = {  # id: (mask: a path, or bytes in the second file)
        "completed": "images/mask.png",
        "completed-bytes": _png(mask),
        "wrong-size": _png(wide),
        "cmyk": cmyk.getvalue(),
        "not-an-image": b"a mask, honestly",
        "missing": "images/nowhere.png",
        "traversal": "../outside.png",
        "symlink-out": "images/escape.png",
        "fifo": "images/pipe.png",
        "null": None,
    }
    for name, kind in (("paths", pa.string()), ("bytes", pa.binary())):
        chosen = [i for i, value in rows.items() if isinstance(value, bytes) == (kind == pa.binary())]
        table = pa.table(
            {
                "id": chosen,
                "prompt": [asked] * len(chosen),
                "seed": [3] * len(chosen),
                "image": ["images/source.png"] * len(chosen),
                "mask": pa.array([rows[i] for i in chosen], kind),
            }
        )
        pq.write_table(table, folder / f"{name}.parquet")
    spec = _spec(str(folder), str(root / "output"), mask_grow=1, mask_blur=1, num_inference_steps=4)
    worker = ShardWorker(spec)
    for shard in plan_shards(spec.input).shards:
        worker.process_shard(shard)
    return root / "output", folder, {row["id"]: row for row in read_metadata(spec.output.path).to_pylist()}


BAD_MASKS = {
    "wrong-size": "the mask is 40x32 but its source is 32x32",
    "cmyk": "CMYK",
    "not-an-image": "not an image",
    "missing": "not found",
    "traversal": "leaves the input file's folder",
    "symlink-out": "leaves the input file's folder",
    "fifo": "not a regular file",
    "null": "the column's value is null",
}


@pytest.mark.model
def test_every_bad_mask_is_a_one_line_invalid_mask_row_and_the_shard_goes_on(inpainted):
    output, _, rows = inpainted
    for row_id, detail in BAD_MASKS.items():
        row = rows[row_id]
        assert row["status"] == "error" and row["error"].startswith("invalid_mask: mask: "), row
        assert re.search(detail, row["error"]) and "\n" not in row["error"], row["error"]
        assert row["path"] is None and row["ssim"] is None
    assert {row_id for row_id, row in rows.items() if row["status"] == "ok"} == {
        "completed",
        "completed-bytes",
    }
    assert (
        rows["traversal"]["mask_image"] == "../outside.png" and rows["completed-bytes"]["mask_image"] is None
    )
    stats = [json.loads(path.read_text()) for path in (output / "shards").glob("*.json")]
    assert sum(s["errors_by_reason"].get("invalid_mask", 0) for s in stats) == len(BAD_MASKS)


@pytest.mark.model
def test_outside_the_mask_the_source_is_kept_within_the_vae_round_trip_and_inside_it_changes(inpainted):
    from diffusers import AutoencoderKL

    output, folder, rows = inpainted
    source = np.asarray(Image.open(folder / "images" / "source.png").convert("RGB")).astype(int)
    mask = np.asarray(Image.open(folder / "images" / "mask.png")) > 0
    # outside: 3 pixels or more from the mask (grown by 1, blurred by 1: its fade ends before)
    near = torch.nn.functional.max_pool2d(torch.from_numpy(mask)[None, None].float(), 7, 1, 3)[0, 0].bool()
    outside = ~near.numpy()
    vae = AutoencoderKL.from_pretrained(DEMO_MODEL, subfolder="vae")
    with torch.no_grad():
        planar = torch.from_numpy(source).permute(2, 0, 1)[None].float() / 127.5 - 1
        round_trip = vae.decode(vae.encode(planar).latent_dist.mode()).sample.clamp(-1, 1)
    round_trip = ((round_trip[0].permute(1, 2, 0) + 1) * 127.5).round().numpy().astype(int)
    vae_error = np.abs(round_trip - source)[outside].max()
    assert vae_error > 0  # the VAE alone would change the kept pixels: the paste-back is what keeps them
    for row_id in ("completed", "completed-bytes"):
        row = rows[row_id]
        drawn = np.asarray(Image.open(output / row["path"]).convert("RGB")).astype(int)
        assert np.abs(drawn - source)[outside].max() <= vae_error
        assert np.array_equal(drawn[outside], source[outside])  # exactly: the source's pixels, pasted back
        assert np.abs(drawn - source)[mask].mean() > 30  # a blue square drawn where the red circle was
        assert row["psnr"] == 100.0 and 0.8 < row["ssim"] <= 1.0  # measured outside the mask
    by_path, from_bytes = (Image.open(output / rows[i]["path"]) for i in ("completed", "completed-bytes"))
    assert np.array_equal(np.asarray(by_path), np.asarray(from_bytes))  # a path or bytes: one mask


def test_the_documented_command_redraws_the_shipped_inpainting_sources(tmp_path):
    words = command("docs/image-to-image.md", r"python -m imagemill\.demo\.sources jobs/inpaint")
    assert words == ["python", "-m", "imagemill.demo.sources", "jobs/inpaint", "--inpaint"]
    done = subprocess.run(
        [sys.executable, *words[1:3], str(tmp_path), "--inpaint"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    shipped = REPO / "jobs" / "inpaint"
    assert pq.read_table(tmp_path / "sources.parquet").equals(pq.read_table(shipped / "sources.parquet"))
    for folder in ("images", "masks"):
        for path in (shipped / folder).iterdir():
            redrawn = Image.open(tmp_path / folder / path.name)
            assert np.array_equal(np.array(Image.open(path)), np.array(redrawn)), path.name
    masks = pq.read_table(shipped / "sources.parquet").column("mask").to_pylist()
    assert all((shipped / mask).exists() for mask in masks)


@pytest.mark.model
def test_a_family_without_an_inpainting_pipeline_is_refused_in_one_line(tmp_path):
    from imagemill.testing.tiny_families import make_tiny_family
    from imagemill.workers.generators.diffusion.generator import DiffusersGenerator

    model = make_tiny_family("pixart", tmp_path / "pixart")
    refused = r"^input.mask_column: PixArt\w+Pipeline has no inpainting pipeline in diffusers; .*mask_column$"
    with pytest.raises(ImagemillError, match=refused) as e:
        DiffusersGenerator(str(model), "float32", "cpu", image_to_image=True, inpainting=True)
    assert "\n" not in str(e.value)
