"""Inpainting masks: a row's `input.mask_column` image made into the (H, W) weights its draw is blended with.

A mask is read exactly as a source is (workers/source_images.py: the same path rules, size bounds and
decoder), so a hostile value gets no further as a mask than as a source. Then one rule for every mode:

- its value is its luminance times its opacity, so white repaints and black or transparent keeps the
  source (grey, black-and-white, palette, RGB and RGBA masks alike, the common editors' exports);
  CMYK, 16-bit and float masks are refused as sources are;
- it is cut at half (>= 128 repaints), so that a mask saved as JPEG, or antialiased, means what it
  shows, and the resize below cannot leave a faint repaint in a corner;
- it must be the size of its source once both are upright (EXIF orientation), and is brought to the
  row's size by the source's own `generation.resize`, so it still covers what it covered;
- `generation.mask_grow` widens it by that many pixels (a square window: every pixel within that
  distance on both axes), then `generation.mask_blur` blurs it (Gaussian, that standard deviation in
  pixels), which is the width over which the drawing fades into the source.

Every failure is the row's `invalid_mask` error, naming the mask column; the shard goes on.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps

from imagemill.core.images import InvalidImage, decode_image
from imagemill.core.spec import GenerationSpec

REPAINT_FROM = 128  # mask values at or above this repaint; below keep the source
MASK_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa")


def mask_values(data: bytes, max_pixels: int) -> Image.Image:
    """The mask as an upright mode-L image of 0 (keep) and 255 (repaint); InvalidImage saying why not."""
    image = decode_image(data, max_pixels, "input.max_image_pixels")
    if image.mode not in MASK_MODES:
        raise InvalidImage(f"mask mode {image.mode} is not 8-bit grey or RGB(A) (CMYK, 16-bit, float)")
    try:
        image = ImageOps.exif_transpose(image)
    except Exception as exc:  # noqa: BLE001 - a corrupt EXIF orientation block, whatever Pillow raises
        raise InvalidImage(f"the mask's EXIF does not read: {type(exc).__name__}") from None
    if image.mode == "P":  # its transparency, if any, becomes alpha
        image = image.convert("RGBA")
    grey_alpha = np.asarray(image.convert("LA"), dtype=np.uint16)
    value = grey_alpha[..., 0] * grey_alpha[..., 1] // 255
    return Image.fromarray(np.where(value >= REPAINT_FROM, 255, 0).astype(np.uint8), mode="L")


def check_size(mask: Image.Image, source: Image.Image) -> None:
    """A mask of another size than its source cannot say which pixels it means: refused."""
    if mask.size != source.size:
        raise InvalidImage(
            f"the mask is {mask.width}x{mask.height} but its source is {source.width}x{source.height}; "
            "draw the mask at the source's size"
        )


def shape_mask(fitted: np.ndarray, generation: GenerationSpec) -> np.ndarray:
    """The mask at the row's size (`fitted`: (H, W) uint8, resized as the source was) cut at half again,
    grown and blurred: (H, W) uint8, 0 where the source is kept exactly."""
    binary = np.where(fitted >= REPAINT_FROM, 255, 0).astype(np.uint8)
    grow = generation.mask_grow
    if grow:
        window = 2 * grow + 1
        planes = torch.from_numpy(binary)[None, None].float()
        binary = F.max_pool2d(planes, window, stride=1, padding=grow)[0, 0].to(torch.uint8).numpy()
    if not generation.mask_blur:
        return binary
    blurred = Image.fromarray(binary, mode="L").filter(ImageFilter.GaussianBlur(generation.mask_blur))
    return np.asarray(blurred, dtype=np.uint8)
