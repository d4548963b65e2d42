"""SSIM and PSNR of image-to-image outputs against their sources, and of upscaled outputs against their
known high-resolution references, on the device, a batch at a time.

The images are already on the device as uint8 when the batch is drawn, so measuring them there costs
a few small convolutions and no copy. SSIM is Wang et al. (2004) as torchmetrics computes it
(`structural_similarity_index_measure` with data_range=255: an 11-pixel Gaussian window of sigma
1.5, k1=0.01, k2=0.03, the image reflected 5 pixels out at its edges, the mean over every pixel and
the three channels); a test holds the two equal. An image of 5 pixels or less a side (enhance-only's
`generation.resize: keep` takes any size) cannot be reflected 5 pixels out: it is not measured (null).

Inpainting measures what must not change: both are averaged over the pixels outside the mask only
(`keep`), SSIM's windows still reading across the mask's edge; a mask that repaints everything
leaves nothing to measure (null).

Super-resolution with `input.reference_column` measures the image as written, at its upscaled size,
against the row's reference (`reference_ssim`, `reference_psnr`): after the upscale stage (and the
safety stage's blur), before the watermark and the encoder. Before encoding, so that the figures are
the upscaler's, the same whatever `output.image_format` and `quality` a job picks (PNG writes these
pixels exactly; a lossy format's loss is its own, and measuring it would need a decode per image).
"""

from __future__ import annotations

import math
from typing import Self

import numpy as np
import torch
import torch.nn.functional as F

from imagemill.core.spec import JobSpec
from imagemill.core.stage_table import STAGE_ROWS
from imagemill.workers.stages.contract import DrawBatch, StageContext

WINDOW = 11
SIGMA = 1.5
K1, K2 = 0.01, 0.03
DATA_RANGE = 255.0
MAX_PSNR = 100.0  # dB, for identical images (infinite otherwise, which JSON records cannot hold)


def _window(size: int, device: torch.device) -> torch.Tensor:
    """The Gaussian window's one-dimensional line (it is separable: the 2-D window is line x line)."""
    offsets = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    line = torch.exp(-(offsets**2) / (2 * SIGMA**2))
    return line / line.sum()


def _planar(images: torch.Tensor) -> torch.Tensor:
    """(N, H, W, C) uint8 → (N, C, H, W) float32."""
    return images.permute(0, 3, 1, 2).to(torch.float32)


def _mean(values: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Each image's mean of (N, H, W) `values`, over the pixels `keep` holds true (all without it);
    NaN where it holds none."""
    if keep is None:
        return values.flatten(1).mean(1)
    weight = keep.to(values.dtype).flatten(1)
    return (values.flatten(1) * weight).sum(1) / weight.sum(1)


def structural_similarity(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The (N, H, W) SSIM map, averaged over channels, of two (N, C, H, W) float batches on the 0..255
    scale: differentiable, so the demo super-resolution trainer's loss is the very SSIM measured here."""
    margin = WINDOW // 2
    x, y = (F.pad(planes, [margin] * 4, mode="reflect") for planes in (x, y))
    line = _window(WINDOW, x.device)
    # the five local moments in one pass of the window, separably: cheap enough for a training loss
    moments = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    channels = moments.shape[1]
    moments = F.conv2d(moments, line.view(1, 1, WINDOW, 1).expand(channels, 1, WINDOW, 1), groups=channels)
    moments = F.conv2d(moments, line.view(1, 1, 1, WINDOW).expand(channels, 1, 1, WINDOW), groups=channels)
    mu_x, mu_y, xx, yy, xy = moments.chunk(5, dim=1)
    var_x = (xx - mu_x**2).clamp(min=0)
    var_y = (yy - mu_y**2).clamp(min=0)
    cov = xy - mu_x * mu_y
    c1, c2 = (K1 * DATA_RANGE) ** 2, (K2 * DATA_RANGE) ** 2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return index.mean(1)


def ssim(first: torch.Tensor, second: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image SSIM of two (N, H, W, 3) uint8 batches, as an (N,) float32 tensor on their device;
    `keep`: (N, H, W) bool, the pixels averaged (all without it)."""
    return _mean(structural_similarity(_planar(first), _planar(second)), keep)


def psnr(first: torch.Tensor, second: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image PSNR in dB of two (N, H, W, 3) uint8 batches, at most MAX_PSNR; `keep` as ssim's."""
    mse = _mean((_planar(first) - _planar(second)).pow(2).mean(1), keep)
    floor = DATA_RANGE**2 / 10 ** (MAX_PSNR / 10)
    return 10 * torch.log10(DATA_RANGE**2 / mse.clamp(min=floor))


def similarity(
    first: torch.Tensor, second: torch.Tensor, keep: torch.Tensor | None = None
) -> list[tuple[float, float] | None]:
    """(SSIM, PSNR) of each pair of images over `keep`'s pixels, copied back together (one transfer
    per batch); None for an image with no pixel to measure, or too small to reflect SSIM's margin."""
    if min(first.shape[1:3]) <= WINDOW // 2:
        return [None] * len(first)
    both = torch.stack([ssim(first, second, keep), psnr(first, second, keep)], dim=1).cpu().tolist()
    return [None if math.isnan(s) else (round(s, 6), round(p, 4)) for s, p in both]


class SimilarityStage:
    """The `similarity` stage (image-to-image jobs): each draw's SSIM and PSNR against its source,
    outside the mask for inpainting."""

    section = "input.image_column"
    needs = ("images", "sources")
    adds = ("similarities",)
    changes_pixels = False
    columns = ("ssim", "psnr")

    @classmethod
    def from_spec(cls, spec: JobSpec, context: StageContext) -> Self | None:
        return cls() if spec.input.image_column is not None else None

    def run(self, batch: DrawBatch) -> None:
        assert batch.sources is not None  # image-to-image batches carry their sources
        keep = None if batch.masks is None else batch.masks == 0
        batch.similarities = similarity(batch.sources, batch.images, keep)


class ReferenceStage:
    """The `reference` stage (`upscale:` with `input.reference_column`): each live draw's SSIM and PSNR,
    at its written size, against its row's reference (read, decoded and size-checked with the row:
    workers/source_images.py, so a row whose reference is bad or of another size is never drawn)."""

    section = "input.reference_column"
    needs = ("images",)
    adds = ()
    changes_pixels = False
    columns = STAGE_ROWS["reference"].column_names  # the table's: the driver reserves them (core/carry.py)

    @classmethod
    def from_spec(cls, spec: JobSpec, context: StageContext) -> Self | None:
        return cls() if spec.input.reference_column is not None else None

    def run(self, batch: DrawBatch) -> None:
        # a dropped draw is written by no one, and a row whose reference is null has none: not measured
        live = [i for i in batch.live if batch.rows[i].reference_pixels is not None]
        if not live:
            return
        references = np.stack([batch.rows[i].reference_pixels for i in live])
        at = torch.tensor(live, device=batch.images.device)
        measured = similarity(torch.from_numpy(references).to(at.device), batch.images[at])
        for i, pair in zip(live, measured, strict=True):
            assert pair is not None  # no mask: every pixel is measured
            batch.columns[i].update(reference_ssim=pair[0], reference_psnr=pair[1])
