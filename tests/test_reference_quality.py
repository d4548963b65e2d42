"""Super-resolution measured against a known high-resolution reference (`input.reference_column`, issue
#25): each written image's `reference_ssim` and `reference_psnr` at its upscaled size, before encoding;
a reference of another size, or a bad file, is the row's `invalid_reference` error and the others are
done; the report's per-label distributions carry the two columns."""

from __future__ import annotations

import io
import json
import os

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
from imagemill.core.evaluation_results import EvaluationResults

SIZE = 16
SCALE = 4  # the tiny network's; rows with `scale` 2 get x2


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _psnr(first: np.ndarray, second: np.ndarray) -> float:
    """PSNR (dB, 0..255) from its definition, for the test alone."""
    mse = np.mean((first.astype(np.float64) - second.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0**2 / mse)


def _ssim(first: np.ndarray, second: np.ndarray) -> float:
    """torchmetrics' SSIM (Wang et al.; Gaussian window 11, sigma 1.5): another implementation."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    planar = [torch.from_numpy(image.copy()).permute(2, 0, 1)[None].double() for image in (first, second)]
    return float(structural_similarity_index_measure(planar[0], planar[1], data_range=255.0))


def test_a_reference_column_needs_an_upscaler_in_one_line(tmp_path):
    base = {"input": {"path": str(tmp_path), "reference_column": "truth"}, "output": {"path": str(tmp_path)}}
    with pytest.raises(ImagemillError) as refused:
        imagemill.build_spec(base | {"model": {"source": "m"}})
    message = str(refused.value)
    assert "input.reference_column" in message and "upscale:" in message and "\n" not in message


@settings(max_examples=30, deadline=None)
@given(
    side=st.sampled_from([8, 16]),
    row_scale=st.sampled_from([None, 2, 4]),
    given_size=st.tuples(st.sampled_from([8, 16, 32, 64]), st.sampled_from([8, 16, 32, 64])),
)
def test_a_reference_is_taken_exactly_at_the_written_size(tmp_path_factory, side, row_scale, given_size):
    """Whatever the row's size and scale (its own or the x4 upscaler's), a reference of the written size
    is taken as it is, pixel for pixel, and any other size is refused naming both sizes and the fix."""
    from imagemill.core.images import InvalidImage
    from imagemill.core.spec import InputSpec
    from imagemill.workers.rows import Row
    from imagemill.workers.source_images import SourceReader, reference_pixels

    folder = tmp_path_factory.mktemp("ref")
    spec = InputSpec(path=str(folder / "p.parquet"), image_column="image", reference_column="truth")
    pixels = np.random.default_rng(side).integers(0, 256, (given_size[1], given_size[0], 3), dtype=np.uint8)
    row = Row(0, 0, "r", None, None, 0, side, side, 1, 0.0, scale=row_scale, reference=_png(pixels))
    written = side * (row_scale or SCALE)
    reader = SourceReader(spec.path, spec)
    if given_size == (written, written):
        assert np.array_equal(reference_pixels(reader, row, spec, SCALE, (side, side)), pixels)
    else:
        with pytest.raises(InvalidImage) as refused:
            reference_pixels(reader, row, spec, SCALE, (side, side))
        says = (
            f"the reference is {given_size[0]}x{given_size[1]} but the upscaled image is {written}x{written}"
        )
        assert str(refused.value).startswith(says) and f"give a reference of {written}x{written}" in str(
            refused.value
        )


@pytest.mark.model
def test_references_give_ssim_and_psnr_of_the_written_image_and_bad_ones_are_row_errors(tmp_path):
    """One enhance-only job through a tiny x4 network: an identical reference (PSNR capped at 100,
    SSIM 1), a degraded one (the values a reference formula gives), an x2 row's reference, wrong sizes,
    hostile files; the report's per-label distributions hold the new columns."""
    from imagemill.testing.in_process import run_in_process
    from imagemill.testing.tiny_upscaler import make_tiny_upscaler
    from imagemill.workers.loading import Pretrained
    from imagemill.workers.stages.upscale import SpandrelUpscaler, reduced

    network = str(make_tiny_upscaler(tmp_path / "x4", SCALE))
    upscaler = SpandrelUpscaler(Pretrained(network, "upscale.source"), "float32", None, 0, "cpu")
    folder = tmp_path / "in"
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    sources = rng.integers(0, 256, (4, SIZE, SIZE, 3), dtype=np.uint8)
    upscaled = upscaler(torch.from_numpy(sources), [""] * 4, [0] * 4)
    exact = upscaled.numpy()
    halved = reduced(upscaled, 2).numpy()  # what an x2 row of the x4 network writes
    degraded = np.clip(exact.astype(int) + rng.integers(-40, 41, exact.shape), 0, 255).astype(np.uint8)
    references = {
        "exact": exact[0],
        "degraded": degraded[1],
        "halved": halved[2],
        "small": exact[3, :48, :48],
        "x4": exact[0],
    }
    for number, pixels in enumerate(sources):
        (folder / "images" / f"s{number}.png").write_bytes(_png(pixels))
    for name, pixels in references.items():
        (folder / "images" / f"{name}.png").write_bytes(_png(pixels))
    (folder / "images" / "truncated.png").write_bytes(_png(exact[0])[:60])
    (tmp_path / "outside.png").write_bytes(_png(exact[0]))
    (folder / "images" / "link-out.png").symlink_to(tmp_path / "outside.png")
    os.mkfifo(folder / "images" / "fifo.png")
    rows = {  # id: (source, reference, scale, label)
        "identical": ("s0", "images/exact.png", None, "kept"),
        "degraded": ("s1", "images/degraded.png", None, "noisy"),
        "halved": ("s2", "images/halved.png", 2, "kept"),
        "wrong-size": ("s3", "images/small.png", None, "noisy"),
        "x4-for-x2": ("s0", "images/x4.png", 2, "noisy"),
        "x3": ("s0", "images/x4.png", 3, "noisy"),  # no scale of the x4 network: the upscaler says so
        "truncated": ("s0", "images/truncated.png", None, "noisy"),
        "link-out": ("s0", "images/link-out.png", None, "noisy"),
        "fifo": ("s0", "images/fifo.png", None, "noisy"),
        "parent": ("s0", "../outside.png", None, "noisy"),
        "null": ("s0", None, None, "noisy"),
    }
    columns = zip(*rows.values(), strict=True)
    source, truth, scale, label = (list(column) for column in columns)
    table = {"id": list(rows), "image": [f"images/{name}.png" for name in source], "truth": truth}
    table |= {"scale": pa.array(scale, pa.int64()), "label": label}
    pq.write_table(pa.table(table), folder / "pairs.parquet")
    output = tmp_path / "out"
    spec = imagemill.build_spec(
        {
            "input": {
                "path": str(folder / "pairs.parquet"),
                "image_column": "image",
                "reference_column": "truth",
                "scale_column": "scale",
                "prompt_column": None,
                "carry_columns": ["label"],
            },
            "output": {"path": str(output)},
            "model": {"kind": "none"},
            "generation": {"width": SIZE, "height": SIZE},
            "upscale": {"source": network, "tile": None},
            "workers": {"batch_size": 4},
            "evaluation": {"features": "pixels"},
        }
    )
    result = run_in_process(spec)
    assert (result.ok, result.errors_by_reason) == (4, {"invalid_reference": 6, "model_rejected": 1})
    metadata = {row["id"]: row for row in read_metadata(str(output)).to_pylist()}

    def written(row_id: str) -> np.ndarray:
        return np.asarray(Image.open(output / metadata[row_id]["path"]).convert("RGB"))

    identical = metadata["identical"]
    assert np.array_equal(written("identical"), exact[0])  # PNG: the measured pixels are the written ones
    assert (identical["reference_psnr"], identical["reference_ssim"]) == (100.0, 1.0)
    degraded_row = metadata["degraded"]
    assert degraded_row["reference_psnr"] == pytest.approx(_psnr(written("degraded"), degraded[1]), abs=1e-3)
    assert degraded_row["reference_ssim"] == pytest.approx(_ssim(written("degraded"), degraded[1]), abs=1e-5)
    assert 10 < degraded_row["reference_psnr"] < 30 and 0 < degraded_row["reference_ssim"] < 0.9
    halved_row = metadata["halved"]
    assert written("halved").shape == (2 * SIZE, 2 * SIZE, 3)
    assert (halved_row["upscale_scale"], halved_row["reference_psnr"], halved_row["reference_ssim"]) == (
        2,
        100.0,
        1.0,
    )
    errors = {row_id: row["error"] for row_id, row in metadata.items() if row["status"] == "error"}
    assert errors["wrong-size"] == (
        "invalid_reference: truth: the reference is 48x48 but the upscaled image is 64x64 (16x16 x4); "
        "give a reference of 64x64"
    )
    assert errors["x4-for-x2"] == (
        "invalid_reference: truth: the reference is 64x64 but the upscaled image is 32x32 (16x16 x2); "
        "give a reference of 32x32"
    )
    assert errors["x3"] == "model_rejected: upscale: scale 3 is not one the upscaler (x4) gives: use 2 or 4"
    hostile = {
        "truncated": "does not decode",
        "link-out": "leaves the input file's folder",
        "fifo": "is not a regular file",
        "parent": "leaves the input file's folder",
    }
    for row_id, says in hostile.items():
        assert errors[row_id].startswith("invalid_reference: truth: ") and says in errors[row_id], errors
        assert "\n" not in errors[row_id] and metadata[row_id]["path"] is None
    unmeasured = metadata["null"]  # a row without a reference is upscaled and written, not measured
    assert (unmeasured["status"], unmeasured["reference_psnr"], unmeasured["reference_ssim"]) == (
        "ok",
        None,
        None,
    )
    assert written("null").shape == (4 * SIZE, 4 * SIZE, 3)
    dataset = EvaluationResults.model_validate(json.loads((output / "report.json").read_text())["dataset"])
    page = (output / "report.html").read_text()
    for column in ("reference_ssim", "reference_psnr"):
        distribution = getattr(dataset, column)
        assert set(distribution.per_label) == {"kept", "noisy"}
        assert distribution.per_label["kept"].count == 2 and distribution.per_label["kept"].mean == (
            100.0 if column == "reference_psnr" else 1.0
        )
        assert distribution.per_label["noisy"].mean == pytest.approx(degraded_row[column])
        assert distribution.all.count == 3
        assert f"{'PSNR in dB' if column == 'reference_psnr' else 'SSIM'} of the upscaled image" in page
    recorded = json.loads((output / "_job.json").read_text())["evaluation"]
    assert recorded["reference_psnr"]["per_label"]["kept"]["mean"] == 100.0
