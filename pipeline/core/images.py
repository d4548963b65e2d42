"""Images in and out: the one decoder of every image the project reads, and the encoding of its outputs.

Decoding (`decode_image`): every image the project reads comes from someone else (sources, reference
sets, files given to `imagemill verify`), so one function holds the whole policy for untrusted bytes:

- only the common raster formats (`IMAGE_FORMATS`): Pillow would otherwise hand an EPS file, whatever
  its name, to Ghostscript;
- the size is checked from the header against the caller's pixel limit before any pixel is decoded
  (Pillow's own limit only warns below 2x its cap);
- the pixels are loaded at once, so a truncated or corrupt file fails here and not later;
- whatever Pillow raises on malformed bytes (OSError, SyntaxError, struct.error, ValueError, …: its
  plugins differ) becomes one InvalidImage with a one-line reason.

Encoding runs on the actor's writer threads.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from PIL import Image

from imagemill.core.errors import one_line
from imagemill.core.spec.rules import (
    DEFAULT_MAX_IMAGE_PIXELS,  # also for files without a setting of their own
)

# Decoded formats (Pillow's names). Not EPS/PS (Ghostscript), PDF, ICO/ICNS, PSD or the rest.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


class InvalidImage(Exception):
    """Why bytes (or the file a source names) cannot be used as an image, in one line."""


def decode_image(
    data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, limit: str = "the limit"
) -> Image.Image:
    """The image in `data`, loaded, in its own mode, with its metadata (`info`, EXIF); InvalidImage
    when it is empty, not an allowed format, over `max_pixels` (`limit`: the setting that says so, for
    the message), or does not decode."""
    if not data:
        raise InvalidImage("the image is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.UnidentifiedImageError:
        raise InvalidImage(f"not an image in a supported format ({', '.join(IMAGE_FORMATS)})") from None
    except Image.DecompressionBombError:
        raise InvalidImage(f"more pixels than {limit} ({max_pixels})") from None
    except Exception as exc:  # noqa: BLE001 - a plugin's error on a malformed header
        raise InvalidImage(f"the image header does not read: {one_line(exc)}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise InvalidImage(f"{width}x{height} is more pixels than {limit} ({max_pixels})")
    try:
        image.load()
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt data, whatever the plugin raises
        raise InvalidImage(f"the image does not decode: {one_line(exc)}") from None
    return image


# The largest side each format's encoder writes: Pillow's WebP and JPEG encoders refuse a larger image.
MAX_ENCODED_SIDE = {"jpeg": 65535, "webp": 16383}


def encoded_size_problem(width: int, height: int, image_format: str) -> str | None:
    """Why a width x height image cannot be encoded as `image_format`, or None when it can."""
    limit = MAX_ENCODED_SIDE.get(image_format)
    if limit is not None and max(width, height) > limit:
        return (
            f"a {width}x{height} image is over {image_format}'s {limit} px a side; "
            "set output.image_format: png, or a smaller upscale"
        )
    return None


def encode_image(pixels: np.ndarray, image_format: str, quality: int, **options: Any) -> bytes:
    """Encode an (H, W, 3) uint8 array; `quality` applies to JPEG and WebP only; `options`: Pillow's
    metadata arguments (pnginfo, exif, xmp; workers/provenance/parameters.py)."""
    image = Image.fromarray(pixels, mode="RGB")
    buffer = io.BytesIO()
    if image_format == "png":
        image.save(buffer, format="PNG", **options)
    elif image_format == "jpeg":
        image.save(buffer, format="JPEG", quality=quality, **options)
    elif image_format == "webp":
        image.save(buffer, format="WEBP", quality=quality, **options)
    else:
        raise ValueError(f"unknown image format {image_format!r}; use png, jpeg or webp")
    return buffer.getvalue()


def thumbnail_data_uri(pixels: np.ndarray | bytes, max_side: int = 96) -> str:
    """A small JPEG as a data: URI, so that a report can show samples without reading any image;
    `pixels` may be an encoded image (JPEG encoded on the GPU)."""
    image = (
        decode_image(pixels).convert("RGB")
        if isinstance(pixels, bytes)
        else Image.fromarray(pixels, mode="RGB")
    )
    image.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
