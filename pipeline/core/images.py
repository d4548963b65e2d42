"""Image encoding: uint8 pixels → PNG/JPEG/WebP bytes. Runs on the actor's writer threads."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from PIL import Image


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
        Image.open(io.BytesIO(pixels)).convert("RGB")
        if isinstance(pixels, bytes)
        else Image.fromarray(pixels, mode="RGB")
    )
    image.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
