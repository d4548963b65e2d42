"""A CLIP image processor's transform as torch ops on the device: what the CLIP scorer and the
evaluation's feature model feed their CLIP vision tower.

Resized (shortest edge, bicubic with antialiasing, rounded to 8 bits as the image processor's own
8-bit resize does), centre-cropped and normalised as `preprocessor_config.json` says; no image goes
through PIL or leaves the device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class ClipPixels:
    def __init__(self, processor: object, device: str, dtype: torch.dtype):
        """`processor`: a transformers CLIP image processor, read for its numbers only."""
        self.shortest_edge: int = processor.size["shortest_edge"]
        self.crop: tuple[int, int] = (processor.crop_size["height"], processor.crop_size["width"])
        self.mean = torch.tensor(processor.image_mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(processor.image_std, device=device).view(1, 3, 1, 1)
        self.dtype = dtype

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(N, H, W, 3) uint8 images → the (N, 3, crop_h, crop_w) model input, on the images' device."""
        pixels = images.permute(0, 3, 1, 2).float()
        height, width = pixels.shape[-2:]
        short, long = min(height, width), max(height, width)
        new_long = int(self.shortest_edge * long / short)  # the image processor's own rounding
        size = (self.shortest_edge, new_long) if height <= width else (new_long, self.shortest_edge)
        if size != (height, width):
            pixels = F.interpolate(pixels, size=size, mode="bicubic", align_corners=False, antialias=True)
            pixels = pixels.round().clamp(0, 255)
        top, left = (size[0] - self.crop[0]) // 2, (size[1] - self.crop[1]) // 2
        pixels = pixels[..., top : top + self.crop[0], left : left + self.crop[1]]
        return ((pixels / 255 - self.mean) / self.std).to(self.dtype)
