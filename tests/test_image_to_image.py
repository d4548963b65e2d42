"""Image-to-image (input.image_column): sources read safely, bad ones become invalid_image rows, the demo
model follows its source at low strength and ignores it at strength 1, the same bytes on every run."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import make_bucket, read_metadata
from doc_pages import command
from PIL import Image

import imagemill
from imagemill.core.errors import ImagemillError
from imagemill.core.spec import build_spec
from imagemill.demo.shapes import Scene, caption, draw
from imagemill.planning.shards import plan_shards
from imagemill.workers.image_similarity import psnr, ssim
from imagemill.workers.source_images import SourceReader, fit
from imagemill.workers.worker import ShardWorker

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = str(REPO / "jobs" / "models" / "demo-shapes")
RED_CIRCLE = Scene("red", "circle", "left", "white")
BLUE_SQUARE = Scene("blue", "square", "right", "black")
GREEN_CIRCLE = Scene("green", "circle", "center", "grey")
# Rows asking for almost no change: 64x64 (sources upscaled by the resize policy), 20 steps of which
# strength 0.05 runs one, no classifier-free guidance (at 3.0 the demo model redraws even the last
# step's x0 after the prompt), and the source's own caption. The demo VAE alone (encode, decode)
# keeps SSIM 0.83-0.92 at 32x32, so the bound the output can reach is the VAE's, not the pipeline's.
NEAR_ZERO = {"strength": 0.05, "width": 64, "height": 64, "num_inference_steps": 20, "guidance_scale": 1.0}


def _png(pixels: np.ndarray | Image.Image) -> bytes:
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _drawn(scene: Scene) -> np.ndarray:
    return draw(scene, np.random.default_rng(0))


def _bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height pixels, with (almost) no pixel data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def _spec(input_path: str, output: str, embed_parameters: str = "public", **generation) -> imagemill.JobSpec:
    return build_spec(
        {
            "input": {"path": input_path, "image_column": "image", "rows_per_shard": 64},
            "output": {"path": output, "embed_parameters": embed_parameters},
            "model": {"source": DEMO_MODEL, "device": "cpu"},
            "generation": {"width": 32, "height": 32, "num_inference_steps": 10, "guidance_scale": 3.0}
            | generation,
            "workers": {"batch_size": 8},
        }
    )


def _output_pixels(output: str, row: dict) -> np.ndarray:
    return np.array(Image.open(Path(output) / row["path"]).convert("RGB"))


def test_ssim_and_psnr_match_torchmetrics():
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    generator = torch.Generator().manual_seed(0)
    first = torch.randint(0, 256, (3, 32, 48, 3), generator=generator, dtype=torch.uint8)
    noise = torch.randint(-60, 60, first.shape, generator=generator)
    second = (first.int() + noise).clamp(0, 255).to(torch.uint8)
    planar = [images.permute(0, 3, 1, 2).float() for images in (first, second)]
    expected = [
        structural_similarity_index_measure(planar[1][i : i + 1], planar[0][i : i + 1], data_range=255.0)
        for i in range(3)
    ]
    assert torch.allclose(ssim(first, second), torch.stack(expected), atol=1e-5)
    expected_psnr = [peak_signal_noise_ratio(planar[1][i], planar[0][i], data_range=255.0) for i in range(3)]
    assert torch.allclose(psnr(first, second), torch.stack(expected_psnr), atol=1e-3)
    assert psnr(first, first).tolist() == [100.0] * 3  # capped, not infinite: JSON records hold it


@pytest.mark.parametrize(
    ("resize", "kept"),
    [("center_crop", "middle"), ("pad", "black bars"), ("stretch", "whole")],
)
def test_resize_policies(resize, kept):
    wide = np.zeros((16, 48, 3), np.uint8)
    wide[:, :16] = (255, 0, 0)  # red | green | blue thirds
    wide[:, 16:32] = (0, 255, 0)
    wide[:, 32:] = (0, 0, 255)
    out = fit(Image.fromarray(wide), 16, 16, resize)
    assert out.shape == (16, 16, 3)
    middle_green = out[8, 8, 1] > 200
    if kept == "middle":
        assert middle_green and out[8, 1, 0] < 60 and out[8, 14, 2] < 60  # only the green third is left
    elif kept == "black bars":
        assert out[0].max() < 10 and out[-1].max() < 10 and middle_green  # bars above and below
    else:
        assert out[8, 1, 0] > 200 and out[8, 14, 2] > 200 and middle_green  # all three squeezed in


def test_source_paths_stay_under_the_input_folder_unless_absolute_paths_are_allowed():
    base = {"path": "s3://bucket/inputs/prompts.parquet", "image_column": "image"}
    reader = SourceReader("s3://bucket/inputs/prompts.parquet", imagemill.core.spec.InputSpec(**base))
    assert reader.location("images/a.png") == "s3://bucket/inputs/images/a.png"
    assert reader.location("./images/../b.png") == "s3://bucket/inputs/b.png"
    for hostile in ["../../etc/passwd", "a/../../b.png", "..", "/etc/passwd", "file:///etc/passwd",
                    "s3://other-bucket/x.png", "", "a\x00b", "x::zip"]:  # fmt: skip
        with pytest.raises(Exception, match="input file's folder|absolute|empty|NUL|chaining") as caught:
            reader.location(hostile)
        assert type(caught.value).__name__ == "InvalidImage"
    allowed = SourceReader(
        base["path"], imagemill.core.spec.InputSpec(**base, allow_absolute_image_paths=True)
    )
    assert allowed.location("s3://other-bucket/x.png") == "s3://other-bucket/x.png"
    with pytest.raises(Exception, match="leaves the input file's folder"):
        allowed.location("../../etc/passwd")  # relative paths stay under the folder even then


def _read_within(reader: SourceReader, value: str, seconds: float) -> bytes | Exception:
    """reader.read(value), or the exception it raised; fails the test when it does not return in time
    (a reader blocked on a FIFO is released by opening the FIFO's other end)."""
    outcome: list[bytes | Exception] = []

    def read() -> None:
        try:
            outcome.append(reader.read(value))
        except Exception as exc:  # noqa: BLE001 - the test looks at which
            outcome.append(exc)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        fifo = Path(reader.folder, value)
        if fifo.is_fifo():
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"reading {value!r} blocked for {seconds} s")
    return outcome[0]


def test_a_symlink_out_of_the_input_folder_and_a_fifo_are_refused_without_blocking(tmp_path):
    folder = tmp_path / "inputs"
    (folder / "images").mkdir(parents=True)
    picture = _png(_drawn(RED_CIRCLE))
    (tmp_path / "secret.png").write_bytes(picture)
    (folder / "images" / "inside.png").write_bytes(picture)
    (folder / "escape.png").symlink_to(tmp_path / "secret.png")
    (folder / "images" / "dotdot.png").symlink_to("../../secret.png")
    (folder / "alias.png").symlink_to(folder / "images" / "inside.png")  # a link that stays inside
    os.mkfifo(folder / "pipe.png")
    spec = imagemill.core.spec.InputSpec(path=str(folder / "prompts.parquet"), image_column="image")
    reader = SourceReader(str(folder / "prompts.parquet"), spec)
    assert _read_within(reader, "alias.png", 10) == picture
    for link in ("escape.png", "images/dotdot.png"):
        refused = _read_within(reader, link, 10)
        assert type(refused).__name__ == "InvalidImage", refused
        assert "leaves the input file's folder" in str(refused)
    refused = _read_within(reader, "pipe.png", 10)
    assert type(refused).__name__ == "InvalidImage" and "not a regular file" in str(refused), refused


class _StalledFileSystem(fsspec.AbstractFileSystem):
    """A store that never answers a read (a hung connection)."""

    protocol = "stalled"

    def _open(self, path, mode="rb", **kwargs):
        threading.Event().wait(60)
        raise FileNotFoundError(path)


def test_a_source_read_that_stalls_is_an_invalid_image_after_the_time_bound(monkeypatch):
    import imagemill.workers.source_images as source_images

    fsspec.register_implementation("stalled", _StalledFileSystem, clobber=True)
    monkeypatch.setattr(source_images, "SOURCE_READ_SECONDS", 0.5)
    spec = imagemill.core.spec.InputSpec(path="stalled://bucket/prompts.parquet", image_column="image")
    refused = _read_within(SourceReader(spec.path, spec), "images/a.png", 10)
    assert type(refused).__name__ == "InvalidImage", refused
    assert "was not read within 0.5 s" in str(refused)


def test_strength_and_resize_are_part_of_the_fingerprint():
    specs = [_spec("p.parquet", "/tmp/o", **settings) for settings in
             ({}, {"strength": 0.5}, {"strength": [0.2, 0.6]}, {"resize": "pad"})]  # fmt: skip
    fingerprints = [spec.fingerprint() for spec in specs]
    assert all(a != b for i, a in enumerate(fingerprints) for b in fingerprints[i + 1 :])
    with pytest.raises(ImagemillError, match=r"generation.strength: .*low <= high"):
        _spec("p.parquet", "/tmp/o", strength=[0.8, 0.2])
    with pytest.raises(ImagemillError, match=r"strength must be a number in \(0, 1\]"):
        _spec("p.parquet", "/tmp/o", strength=0)
    with pytest.raises(ImagemillError, match=r"strength 0.05 x num_inference_steps 10 runs no denoising"):
        _spec("p.parquet", "/tmp/o", strength=[0.05, 0.5])


def test_strength_per_row_from_its_column_the_job_or_a_range_drawn_from_its_seed():
    from imagemill.core.shard import Shard
    from imagemill.core.spec import GenerationSpec, InputSpec
    from imagemill.workers.rows import make_batches, prepare_rows

    table = pa.table(
        {
            "id": [f"r{i}" for i in range(40)],
            "prompt": ["a red circle"] * 40,
            "image": ["a.png"] * 40,
            "strength": [0.25, 1.5, None, 0.04] + [None] * 36,
        }
    )
    shard = Shard("s", "/data/p.parquet", "p", 0, 1, 0, 40)
    spec = InputSpec(path="/data", image_column="image")

    def prepare(strength):
        defaults = GenerationSpec(width=32, height=32, num_inference_steps=10, strength=strength)
        return prepare_rows(table, shard, spec, defaults)

    rows = prepare([0.3, 0.7])
    assert rows[0].strength == 0.25 and rows[0].error is None  # the column's value
    assert rows[1].error == "invalid_parameter: strength must be a number in (0, 1], got 1.5"
    assert rows[3].error.startswith("invalid_parameter: strength 0.04 x num_inference_steps 10 runs no")
    drawn = [row.strength for row in rows[2:3] + rows[4:]]
    assert all(0.3 <= value <= 0.7 and value == round(value, 2) for value in drawn) and len(set(drawn)) > 5
    assert drawn == [row.strength for row in prepare([0.3, 0.7])[2:3] + prepare([0.3, 0.7])[4:]]
    assert all(len({row.strength for row in batch}) == 1 for batch in make_batches(rows, 8))
    assert {row.strength for row in prepare(0.6)[4:]} == {0.6}
    assert prepare_rows(table, shard, InputSpec(path="/data"), GenerationSpec())[0].strength is None


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    """One shard on the demo model: good sources at strengths near 0 and 1, and every kind of bad one."""
    root = tmp_path_factory.mktemp("img2img")
    folder = root / "inputs"
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "red-circle.png").write_bytes(_png(_drawn(RED_CIRCLE)))
    (folder / "images" / "blue-square.png").write_bytes(_png(_drawn(BLUE_SQUARE)))
    (root / "outside.png").write_bytes(_png(_drawn(RED_CIRCLE)))  # exists, but outside the input folder
    grey16 = Image.fromarray(np.full((32, 32), 40000, np.uint16))
    rgba = Image.fromarray(np.full((32, 32, 4), 200, np.uint8))
    cmyk = io.BytesIO()
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(cmyk, format="JPEG")
    translucent = Image.new("P", (32, 32))
    translucent.info["transparency"] = 0
    big = _png(np.zeros((40, 40, 3), np.uint8))
    (folder / "images" / "escape.png").symlink_to(root / "outside.png")
    os.mkfifo(folder / "images" / "pipe.png")
    webp = io.BytesIO()
    Image.fromarray(_drawn(RED_CIRCLE)).save(webp, format="WEBP")
    bmp_buffer = io.BytesIO()
    Image.fromarray(_drawn(RED_CIRCLE)).save(bmp_buffer, format="BMP")
    bmp = bytearray(bmp_buffer.getvalue())
    bmp[30] = 0x77  # a compression no BMP has
    other_prompt = caption(Scene("green", "triangle", "top", "grey"))
    (folder / "images" / "green-circle.png").write_bytes(_png(_drawn(GREEN_CIRCLE)))
    rows = {  # id: (image, strength, prompt); NEAR_ZERO's parameters for rows of strength 0.05
        "near-zero": ("images/green-circle.png", 0.05, caption(GREEN_CIRCLE)),
        "bytes-source": (_png(_drawn(GREEN_CIRCLE)), 0.05, caption(GREEN_CIRCLE)),
        "full-red": ("images/red-circle.png", 1.0, other_prompt),
        "full-blue": ("images/blue-square.png", 1.0, other_prompt),
        "missing": ("images/nowhere.png", 0.5, other_prompt),
        "not-an-image": (b"this is text, not a picture", 0.5, other_prompt),
        "truncated": (_png(_drawn(RED_CIRCLE))[:120], 0.5, other_prompt),
        "bomb": (_bomb_png(60_000, 60_000), 0.5, other_prompt),
        "too-many-pixels": (big, 0.5, other_prompt),
        "cmyk": (cmyk.getvalue(), 0.5, other_prompt),
        "sixteen-bit": (_png(grey16), 0.5, other_prompt),
        "alpha": (_png(rgba), 0.5, other_prompt),
        "transparent-palette": (_png(translucent), 0.5, other_prompt),
        "traversal": ("../outside.png", 0.5, other_prompt),
        "symlink-out": ("images/escape.png", 0.5, other_prompt),
        "fifo": ("images/pipe.png", 0.5, other_prompt),
        "truncated-webp": (webp.getvalue()[: len(webp.getvalue()) // 2], 0.5, other_prompt),
        "broken-bmp-header": (bytes(bmp), 0.5, other_prompt),
        "absolute": (str(root / "outside.png"), 0.5, other_prompt),
        "file-url": (f"file://{root / 'outside.png'}", 0.5, other_prompt),
        "null": (None, 0.5, other_prompt),
        "no-step": ("images/red-circle.png", 0.09, other_prompt),  # 10 steps x 0.09: none to run
    }
    # A column holds one type: path rows (strings, and the null) in one file, bytes rows in another.
    for name, kind in (("paths", pa.string()), ("bytes", pa.binary())):
        chosen = [i for i, (value, _, _) in rows.items() if isinstance(value, bytes) == (kind == pa.binary())]
        columns = {
            "id": chosen,
            "prompt": [rows[i][2] for i in chosen],
            "strength": [rows[i][1] for i in chosen],
            "seed": [5] * len(chosen),  # one seed and one prompt: only the sources differ
            **{
                name: [value if rows[i][1] == NEAR_ZERO["strength"] else None for i in chosen]
                for name, value in NEAR_ZERO.items()
                if name != "strength"
            },
            "image": pa.array([rows[i][0] for i in chosen], kind),
        }
        pq.write_table(pa.table(columns), folder / f"{name}.parquet")
    spec = _spec(str(folder), str(root / "output"), seed=7)
    spec.input.max_image_pixels = 1500  # 32x32 sources pass, the 40x40 one does not
    worker = ShardWorker(spec)
    for shard in plan_shards(spec.input).shards:
        worker.process_shard(shard)
    return root / "output", {row["id"]: row for row in read_metadata(spec.output.path).to_pylist()}


BAD_SOURCES = {
    "missing": "not found",
    "not-an-image": "not an image",
    "truncated": "does not decode|not an image",
    "bomb": "max_image_pixels",
    "too-many-pixels": "max_image_pixels",
    "cmyk": "CMYK",
    "sixteen-bit": "16-bit",
    "alpha": "alpha",
    "transparent-palette": "alpha",
    "traversal": "leaves the input file's folder",
    "symlink-out": "leaves the input file's folder",
    "fifo": "not a regular file",
    "truncated-webp": "does not (read|decode)",
    "broken-bmp-header": "does not (read|decode)",
    "absolute": "absolute",
    "file-url": "absolute",
    "null": "null",
}


@pytest.mark.model
def test_every_bad_source_is_an_invalid_image_row_and_the_rest_of_the_shard_is_done(demo_run):
    output, rows = demo_run
    for row_id, detail in BAD_SOURCES.items():
        row = rows[row_id]
        assert row["status"] == "error" and row["error"].startswith("invalid_image: "), row
        assert re.search(detail, row["error"]), row["error"]
        assert row["path"] is None and row["ssim"] is None
    assert rows["no-step"]["error"].startswith("invalid_parameter: strength 0.09 x num_inference_steps 10")
    done = {row_id for row_id, row in rows.items() if row["status"] == "ok"}
    assert done == {"near-zero", "bytes-source", "full-red", "full-blue"}
    assert rows["traversal"]["source_image"] == "../outside.png"  # the source as the column gave it
    assert rows["bytes-source"]["source_image"] is None  # bytes: input_file + input_row name it
    assert rows["near-zero"]["width"] == 64 and rows["missing"]["width"] == 32
    stats = [json.loads(path.read_text()) for path in (output / "shards").glob("*.json")]
    assert sum(s["errors_by_reason"].get("invalid_image", 0) for s in stats) == len(BAD_SOURCES)


def test_strength_near_zero_returns_the_source_and_strength_one_ignores_it(demo_run):
    output, rows = demo_run
    near, from_bytes = rows["near-zero"], rows["bytes-source"]
    assert near["strength"] == 0.05 and near["ssim"] >= 0.9 and from_bytes["ssim"] >= 0.9
    source = fit(Image.fromarray(_drawn(GREEN_CIRCLE)), 64, 64, "center_crop")
    recorded = ssim(*(torch.from_numpy(np.array(a))[None] for a in (source, _output_pixels(output, near))))
    assert recorded.item() == pytest.approx(near["ssim"], abs=1e-4)  # what the metadata says is true
    red, blue = rows["full-red"], rows["full-blue"]
    assert red["ssim"] < 0.6 and blue["ssim"] < 0.6
    # The same prompt and seed from two very different sources: the same picture, drawn from the prompt.
    drawn = [torch.from_numpy(_output_pixels(output, row))[None] for row in (red, blue)]
    assert ssim(*drawn).item() > 0.9


def _shipped_sources_run(input_path: str, output: str) -> dict[str, dict]:
    """The shipped example's sources (jobs/img2img), strengths drawn from a range, in this process."""
    # the files' public parameters name the input file and the sources by file name only, so the same
    # spec from S3 and from a local folder embeds the same bytes
    spec = _spec(input_path, output, num_inference_steps=4, strength=[0.3, 0.9])
    (shard,) = plan_shards(spec.input).shards
    ShardWorker(spec).process_shard(shard)
    return {row["id"]: row for row in read_metadata(output).to_pylist()}


def test_sources_on_s3_resolve_relative_paths_and_give_the_same_bytes_as_a_local_run(s3_endpoint, tmp_path):
    bucket = make_bucket("img2img-sources")
    fs = fsspec.filesystem("s3")
    fs.put(str(REPO / "jobs" / "img2img"), f"{bucket}/in", recursive=True)
    remote = _shipped_sources_run(f"{bucket}/in/sources.parquet", f"{bucket}/out")
    local = _shipped_sources_run(str(REPO / "jobs" / "img2img" / "sources.parquet"), str(tmp_path / "out"))
    assert len(remote) == 6 and all(row["status"] == "ok" for row in remote.values())
    assert {row_id: row["sha256"] for row_id, row in remote.items()} == {
        row_id: row["sha256"] for row_id, row in local.items()
    }  # another run, another store: the same bytes
    strengths = [row["strength"] for row in remote.values()]
    assert all(0.3 <= value <= 0.9 and value == round(value, 2) for value in strengths)
    assert len(set(strengths)) > 1  # drawn per row, from the row's seed
    assert {row["source_image"] for row in remote.values()} == {
        f"images/{path.name}" for path in (REPO / "jobs" / "img2img" / "images").iterdir()
    }


def test_a_family_without_an_image_to_image_pipeline_is_refused_in_one_line(tmp_path):
    from imagemill.testing.tiny_families import make_tiny_family
    from imagemill.workers.generators.diffusion.generator import DiffusersGenerator

    model = make_tiny_family("pixart", tmp_path / "pixart")
    refused = r"input.image_column: PixArt\w+Pipeline has no image-to-image pipeline"
    with pytest.raises(ImagemillError, match=refused) as e:
        DiffusersGenerator(str(model), "float32", "cpu", image_to_image=True)
    assert "\n" not in str(e.value)


def test_an_input_without_the_image_column_is_refused_in_one_line_at_planning(tmp_path):
    table = pa.table({"id": ["a"], "prompt": ["a red circle"], "picture": [b"x"]})
    pq.write_table(table, tmp_path / "p.parquet")
    spec = _spec(str(tmp_path / "p.parquet"), str(tmp_path / "out"))
    with pytest.raises(ImagemillError, match=r"image column 'image' not found in .*p\.parquet; .*picture\. "
                       r"Set input\.image_column"):  # fmt: skip
        plan_shards(spec.input)


def test_the_documented_command_redraws_the_shipped_sources(tmp_path):
    words = command("docs/image-to-image.md", r"python -m imagemill\.demo\.sources jobs/img2img")
    assert words == ["python", "-m", "imagemill.demo.sources", "jobs/img2img"]
    done = subprocess.run([sys.executable, *words[1:3], str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    shipped = REPO / "jobs" / "img2img"
    assert pq.read_table(tmp_path / "sources.parquet").equals(pq.read_table(shipped / "sources.parquet"))
    for path in (shipped / "images").iterdir():
        redrawn = Image.open(tmp_path / "images" / path.name)
        assert np.array_equal(np.array(Image.open(path)), np.array(redrawn)), path.name


@pytest.mark.model
def test_the_report_shows_ssim_and_psnr_against_the_sources_per_label(tmp_path):
    """The shipped sources labelled by shape, redrawn twice each: report.json's dataset section and
    report.html hold each label's SSIM and PSNR distribution, as the metadata's rows give them."""
    from imagemill.core.evaluation_results import EvaluationResults
    from imagemill.testing.in_process import run_in_process

    folder = tmp_path / "in"
    shutil.copytree(REPO / "jobs" / "img2img" / "images", folder / "images")
    sources = pq.read_table(REPO / "jobs" / "img2img" / "sources.parquet")
    shapes = [row_id.split("-")[1] for row_id in sources.column("id").to_pylist()]  # red-circle-left
    pq.write_table(sources.append_column("label", pa.array(shapes)), folder / "sources.parquet")
    output = tmp_path / "out"
    spec = build_spec(
        {
            "input": {
                "path": str(folder / "sources.parquet"),
                "image_column": "image",
                "carry_columns": ["label"],
            },
            "output": {"path": str(output)},
            "model": {"source": DEMO_MODEL, "device": "cpu"},
            "generation": {"width": 32, "height": 32, "num_inference_steps": 4, "strength": [0.3, 0.9]}
            | {"images_per_prompt": 2},
            "workers": {"batch_size": 12},
            "evaluation": {"features": "pixels"},
        }
    )
    assert run_in_process(spec).ok == 12
    metadata = read_metadata(str(output)).to_pandas()
    dataset = EvaluationResults.model_validate(json.loads((output / "report.json").read_text())["dataset"])
    page = (output / "report.html").read_text()
    for column, title in (("ssim", "SSIM against the source image"), ("psnr", "PSNR in dB against")):
        distribution = getattr(dataset, column)
        assert set(distribution.per_label) == {"circle", "square", "triangle"}
        for label, summary in distribution.per_label.items():
            values = metadata[metadata["label"] == label][column].to_numpy()
            assert summary.count == len(values) == 4
            assert summary.mean == pytest.approx(values.mean()) and summary.p50 == pytest.approx(
                np.median(values)
            )
            cells = [
                summary.count,
                *(round(q, 4) for q in (summary.mean, summary.p10, summary.p50, summary.p90)),
            ]
            assert f"<td>{label}</td>" + "".join(f'<td class="num">{cell}</td>' for cell in cells) in page
        assert title in page
