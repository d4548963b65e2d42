"""Image encoding: uint8 pixels → PNG/JPEG/WebP bytes. Runs on the actor's writer threads."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def encode_image(pixels: np.ndarray, image_format: str, quality: int) -> bytes:
    """Encode an (H, W, 3) uint8 array; `quality` applies to JPEG and WebP only."""
    image = Image.fromarray(pixels, mode="RGB")
    buffer = io.BytesIO()
    if image_format == "png":
        image.save(buffer, format="PNG")
    elif image_format == "jpeg":
        image.save(buffer, format="JPEG", quality=quality)
    elif image_format == "webp":
        image.save(buffer, format="WEBP", quality=quality)
    else:
        raise ValueError(f"unknown image format {image_format!r}; use png, jpeg or webp")
    return buffer.getvalue()
