"""The invisible watermark survives a JPEG q90 re-encode, and `imagemill verify` reports it.

Textured 256² images (smoothed noise over gradients, as generated images have texture and shading),
not flat colours: a flat or clipped (pure white) image has no room to carry the bits.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import imagemill
from imagemill.core.errors import ImagemillError
from imagemill.provenance.verify import verify
from imagemill.provenance.watermark import add_watermark

PAYLOAD = "imgmill"  # 56 bits
N_IMAGES = 20


def gaussian_filter(values: np.ndarray, sigma: float) -> np.ndarray:
    """scipy.ndimage.gaussian_filter's defaults (mirrored edges, radius 4σ) in numpy: scipy is not
    installed for this alone, as diffusers imports it whenever present (a second per actor start)."""
    radius = int(4 * sigma + 0.5)
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    for axis in (0, 1):
        padded = np.pad(values, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)], "symmetric")
        values = np.apply_along_axis(np.convolve, axis, padded, kernel, "valid")
    return values


def textured(index: int, side: int = 256) -> np.ndarray:
    rng = np.random.default_rng(index)
    noise = np.stack(
        [gaussian_filter(rng.random((side, side)), sigma=rng.uniform(1, 8)) for _ in range(3)], -1
    )
    noise = (noise - noise.min()) / (noise.max() - noise.min())
    yy, xx = np.mgrid[0:side, 0:side] / side
    return ((0.6 * noise + 0.4 * np.stack([xx, yy, (xx + yy) / 2], -1)) * 255).astype(np.uint8)


def jpeg_q90(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_the_watermark_survives_a_jpeg_q90_reencode_and_verify_reports_it(tmp_path):
    for index in range(N_IMAGES):
        marked = add_watermark(textured(index), PAYLOAD, "dwtDctSvd")
        (tmp_path / f"{index}.jpg").write_bytes(jpeg_q90(marked))
    report = verify([str(tmp_path)], watermark=PAYLOAD)
    found = sum(bool(check.watermark_found) for check in report.checks)
    assert found >= 0.95 * N_IMAGES, report.text()
    assert f"watermark found in {found} of {N_IMAGES} checked" in report.text()


def test_an_image_without_the_watermark_is_reported(tmp_path):
    (tmp_path / "plain.jpg").write_bytes(jpeg_q90(textured(99)))
    report = verify([str(tmp_path)], watermark=PAYLOAD)
    assert [check.watermark_found for check in report.checks] == [False]
    assert report.text().startswith(f"FAILED {tmp_path}/plain.jpg: watermark not found")


@pytest.mark.parametrize(
    ("watermark", "width", "problem"),
    [
        ({"payload": "more than 8 bytes"}, 512, "1 to 64 bits"),
        ({"payload": "0xabc"}, 512, "hex digits"),
        ({"payload": "ok"}, 128, "256x256"),
    ],
)
def test_a_watermark_that_cannot_be_carried_is_refused_when_the_spec_loads(watermark, width, problem):
    data = {
        "input": {"path": "/in"},
        "output": {"path": "/out", "watermark": watermark},
        "model": {"source": "/m"},
        "generation": {"width": width, "height": width},
    }
    with pytest.raises(ImagemillError, match=problem):
        imagemill.build_spec(data)


def test_the_payload_is_in_the_fingerprint():
    def spec(payload):
        output = {"path": "/out", "watermark": {"payload": payload}}
        return imagemill.build_spec({"input": {"path": "/in"}, "output": output, "model": {"source": "/m"}})

    assert spec("a").fingerprint() != spec("b").fingerprint()
