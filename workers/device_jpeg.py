"""JPEG encoding on the GPU (nvJPEG through torchvision), before the copy back.

A few-step model on a fast GPU makes 30-60 images/s, more than the CPU cores beside it can encode
with Pillow. On CUDA with `output.image_format: jpeg`, the worker encodes each batch where the images
already are, so only compressed bytes cross PCIe and no writer thread encodes. nvJPEG's bytes differ
from Pillow's (another encoder; both decode to nearly the same pixels), so a job's JPEGs depend on
whether this path ran: it runs exactly when the device is CUDA and torchvision imports, which the
job's `model.device` and the node's install decide, and only when nothing needs the pixels on the CPU
(no watermark, no safety filter). The parameters are added to nvJPEG's bytes as EXIF and XMP segments
(provenance/parameters.py), so the file says what a Pillow-encoded one says. torchvision is an
optional extra (`gpu-jpeg`).
"""

from __future__ import annotations

from typing import Self

import torch

from imagemill.core.spec import JobSpec
from imagemill.workers.stages.contract import DrawBatch, StageContext


class DeviceJpeg:
    """Batched nvJPEG encoding of uint8 (N, H, W, 3) images on a CUDA device."""

    def __init__(self, quality: int):
        from torchvision.io import encode_jpeg  # optional: only CUDA nodes with the gpu-jpeg extra

        self.encode_jpeg = encode_jpeg
        self.quality = quality

    @classmethod
    def for_job(cls, spec: JobSpec, device: str) -> DeviceJpeg | None:
        """The encoder when this job's images are JPEG on a CUDA device with torchvision and nothing
        needs the pixels on the CPU (a watermark is added to pixels; a safety filter may blur them);
        else None (the writer threads encode with Pillow)."""
        out = spec.output
        if out.image_format != "jpeg" or not device.startswith("cuda"):
            return None
        if out.watermark is not None or spec.safety is not None:
            return None
        try:
            return cls(out.quality)
        except ImportError:
            return None

    def encode(self, images: torch.Tensor) -> list[bytes]:
        """Each image's JPEG bytes; one nvJPEG call for the batch, then one small copy per image."""
        planar = list(images.permute(0, 3, 1, 2).contiguous().unbind(0))  # nvJPEG takes (3, H, W)
        return [data.cpu().numpy().tobytes() for data in self.encode_jpeg(planar, quality=self.quality)]


class CopyBackStage:
    """The `copy_back` stage, the last on the device: the chunk's images to the host, as uint8 pixels,
    or as the JPEG bytes nvJPEG made of them on the device (`DeviceJpeg.for_job`). One transfer per
    chunk; what follows runs on host values."""

    section = None
    needs = ("images",)
    adds = ("pixels",)
    changes_pixels = False  # nvJPEG encodes the same pixels; the writer stage then encodes nothing
    columns = ()

    def __init__(self, device_jpeg: DeviceJpeg | None):
        self.device_jpeg = device_jpeg

    @classmethod
    def from_spec(cls, spec: JobSpec, context: StageContext) -> Self | None:
        return cls(DeviceJpeg.for_job(spec, context.device))

    def run(self, batch: DrawBatch) -> None:
        """Queue the copy without waiting for it (the selection's `choose` waits, after the next batch
        is launched): CUDA images into pinned host memory, `non_blocking`; the emulated accelerator's,
        already in host memory, as they are. The pixels are views, to be read once the copy is done.
        nvJPEG waits, for the sizes of what it encoded."""
        images = batch.images
        if self.device_jpeg is not None:
            batch.pixels = self.device_jpeg.encode(images)
            return
        if images.is_cuda:
            host = torch.empty(images.shape, dtype=images.dtype, pin_memory=True)
            host.copy_(images, non_blocking=True)
            images = host
        batch.pixels = list(images.numpy())
