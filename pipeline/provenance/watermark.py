"""An invisible watermark in the pixels, with the invisible-watermark library (as SDXL's pipelines use it).

Applied to the uint8 image before it is encoded, so it survives re-encoding, unlike metadata. The
library reads and writes BGR arrays. Decoding gives each bit by a majority over the image's blocks, so
a lossy re-encode can flip a few: a payload counts as found with at most one wrong bit in
ALLOWED_BIT_ERRORS_PER (3 of 48); for 48 bits a random image matches that with odds of about 1e-10.

Method: `dwtDctSvd` by default. Measured on 20 textured 256² images after a JPEG q90 re-encode (the
test's images): dwtDctSvd recovered 48 bits with at most 1 wrong in every one; `dwtDct` (SDXL's
choice, its default scales embed in the U channel, which JPEG's 4:2:0 subsampling halves) lost 10-25
of 48 in every one. dwtDctSvd costs about 3x more CPU (1.8 s for a 1024² image on one core; counted
in the shard's `image_encode` seconds).

Pixels clipped at pure black or white cannot carry it (the embedding would push them past 0 or 255):
a solid colour near either end, or a white background, reads back wrong. The actor therefore reads
every watermark back from the encoded file, through the one decoder a reader uses (`reads_back`), and
with `on_unreadable: retry` embeds it once more with the levels pulled RETRY_HEADROOM in from both ends
first. Measured on 12 images with a white or black background after JPEG and WebP q90: none read
back as they were, all 12 with a headroom of 4, 8, 16 or 24 levels; 8 is the smallest with no more
than 1 wrong bit after WebP. The decoder is the same, so `imagemill verify` needs no setting for it.
What headroom cannot help: a flat, saturated colour whose faint chroma change JPEG or WebP quantises
away (1 of 16 noop colours in tests/test_watermark_readback.py); its row stays `watermark_ok: false`.
"""

from __future__ import annotations

import numpy as np

from imagemill.core.images import decode_image
from imagemill.core.spec import ALLOWED_BIT_ERRORS_PER, payload_bits, watermark_size_problem
from imagemill.provenance import optional_library


def _bgr(pixels: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(pixels[..., ::-1])


RETRY_HEADROOM = 8  # levels kept clear of 0 and 255 by `on_unreadable: retry` (measured above)


def add_watermark(pixels: np.ndarray, payload: str, method: str, headroom: int = 0) -> np.ndarray:
    """`pixels` (H, W, 3) uint8 RGB with the payload embedded; `headroom`: the levels first mapped
    linearly into headroom..255-headroom. ValueError for an image too small."""
    problem = watermark_size_problem(pixels.shape[1], pixels.shape[0])
    if problem:
        raise ValueError(f"output.watermark {problem}")
    if headroom:
        scale = (255 - 2 * headroom) / 255
        pixels = np.rint(headroom + pixels.astype(np.float32) * scale).astype(np.uint8)
    encoder = optional_library("imwatermark", "output.watermark").WatermarkEncoder()
    encoder.set_watermark("bits", payload_bits(payload))
    marked = encoder.encode(_bgr(pixels), method)
    return _bgr(np.clip(np.rint(marked), 0, 255).astype(np.uint8))


def wrong_bits(pixels: np.ndarray, payload: str, method: str) -> int | None:
    """How many of the payload's bits read back wrong from `pixels`; None for an image too small."""
    if watermark_size_problem(pixels.shape[1], pixels.shape[0]):
        return None
    expected = np.array(payload_bits(payload), dtype=bool)
    decoder = optional_library("imwatermark", "--watermark").WatermarkDecoder("bits", len(expected))
    found = np.asarray(decoder.decode(_bgr(pixels), method), dtype=bool)
    return int(np.count_nonzero(found != expected))


def reads_back(data: bytes, payload: str, method: str) -> bool:
    """Whether the payload is found in an encoded image file, decoded as `imagemill verify` decodes it."""
    pixels = np.asarray(decode_image(data).convert("RGB"))
    return is_found(wrong_bits(pixels, payload, method), payload)


def is_found(wrong: int | None, payload: str) -> bool:
    """Whether `wrong` bits of the payload read back wrong still count as the payload being there."""
    return wrong is not None and wrong <= len(payload_bits(payload)) // ALLOWED_BIT_ERRORS_PER
