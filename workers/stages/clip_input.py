"""A CLIP vision model's input made from uint8 images on the device, as its image processor config says.

The CLIP scorer (scoring.py) and the safety checker (safety.py) both take CLIP image embeddings of
the generated images where the generator left them, before the copy back: resized (shortest edge,
bicubic with antialiasing, rounded to 8 bits as the image processor's own 8-bit resize does),
centre-cropped and normalised with torch ops. No image goes through PIL or leaves the device for this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ClipImageInput:
    shortest_edge: int
    crop: tuple[int, int]  # height, width
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, processor: Any) -> ClipImageInput:
        """The numbers of a loaded `CLIPImageProcessor` (its `preprocessor_config.json`)."""
        return cls(
            processor.size["shortest_edge"],
            (processor.crop_size["height"], processor.crop_size["width"]),
            tuple(processor.image_mean),
            tuple(processor.image_std),
        )

    def __call__(self, images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
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
        mean = torch.tensor(self.mean, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=pixels.device).view(1, 3, 1, 1)
        return ((pixels / 255 - mean) / std).to(dtype)
