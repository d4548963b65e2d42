"""Super-resolution (`upscale:`): each kept draw enlarged by a single-image SR network, on the device,
after the safety stage (a flagged draw is upscaled blurred, a dropped one not at all) and before the
evaluation features, the copy back and the encoder, which then all see the upscaled image.

The network is a safetensors state dict (`model.safetensors` in the section's source, fetched through
workers/loading.py's `Pretrained`) whose architecture spandrel recognises from its keys (Real-ESRGAN,
Compact, SPAN, SwinIR, HAT, ...): the library ComfyUI and chaiNNer use, so no architecture is copied
here. Its scale is the network's. An image with a side longer than `tile` is upscaled in tiles that
each read `tile_overlap` input pixels of context beyond their edges, cut from their output: with an
overlap at least the network's receptive field, the tiles are seamless (equal to the whole image's
result up to floating point), and a 4096² output fits in a GPU's memory. All draws of a chunk share
their size, so each tile runs once for the whole chunk, batched.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any, Self

import torch

from imagemill.core.errors import ImagemillError
from imagemill.core.spec import JobSpec
from imagemill.core.stage_table import STAGE_ROWS
from imagemill.workers.loading import Pretrained
from imagemill.workers.stages.contract import DrawBatch, StageContext

WEIGHTS = "model.safetensors"
INSTALL = "python -m pip install --no-deps spandrel einops"


@contextlib.contextmanager
def _without_torchvision() -> Iterator[None]:
    """spandrel imports torchvision when it is imported, for two architectures that are not
    super-resolution (LaMa inpainting, RestoreFormer faces). Where torchvision does not import (a CPU
    torch beside PyPI's CUDA torchvision), the three names they take are stand-ins that raise if
    called, for the import only; they are gone from sys.modules after it."""
    try:
        import torchvision.transforms.functional  # noqa: F401
    except Exception:
        pass
    else:
        yield
        return

    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise ImagemillError("this spandrel architecture needs torchvision, which does not import here")

    names = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
    saved = {name: sys.modules.get(name) for name in names}
    stand_in = types.ModuleType("torchvision.transforms.functional")
    stand_in.InterpolationMode = types.SimpleNamespace()  # type: ignore[attr-defined]
    stand_in.rotate = stand_in.normalize = unavailable  # type: ignore[attr-defined]
    for name in names:
        sys.modules[name] = stand_in
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def spandrel_loader(device: str) -> Any:
    """spandrel's `ModelLoader` on `device`; a one-line error naming the install when it is missing."""
    try:
        with _without_torchvision():
            from spandrel import ModelLoader
    except ImportError:
        raise ImagemillError(f"upscale: needs the spandrel package: {INSTALL}") from None
    return ModelLoader(device)


class Upscaler:
    """The network of an `upscale:` section on the actor's device, and what the metadata says of it."""

    def __init__(self, source: Pretrained, dtype: str, tile: int | None, overlap: int, device: str):
        from safetensors.torch import load_file

        path = source.safetensors_file(WEIGHTS)
        with open(path, "rb") as weights:
            self.sha256 = hashlib.file_digest(weights, "sha256").hexdigest()
        try:
            descriptor = spandrel_loader(device).load_from_state_dict(load_file(path))
        except ImagemillError:
            raise
        except Exception as exc:  # spandrel's UnsupportedModelError, or a key of the wrong shape
            reason = " ".join(str(exc).split())[:200]
            raise ImagemillError(
                f"{source.setting} {source.source}: {WEIGHTS} is no network spandrel knows ({reason})"
            ) from None
        if descriptor.purpose not in ("SR", "FaceSR") or descriptor.scale < 2:
            raise ImagemillError(
                f"{source.setting} {source.source}: {WEIGHTS} is a {descriptor.architecture.name} "
                f"{descriptor.purpose} network of scale {descriptor.scale}, not super-resolution"
            )
        try:
            self.network = descriptor.to(device, getattr(torch, dtype)).eval()
        except Exception as exc:  # spandrel's UnsupportedDtypeError
            raise ImagemillError(f"upscale.dtype: {exc}; set upscale.dtype: float32") from None
        self.scale: int = descriptor.scale
        self.name = source.source
        self.tile = tile
        self.overlap = overlap

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(N, H, W, 3) uint8 images → (N, H·scale, W·scale, 3) uint8, on their device."""
        pixels = images.permute(0, 3, 1, 2).to(self.network.dtype) / 255
        larger = tiled(self.network, pixels, self.scale, self.tile, self.overlap)
        return (larger.float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def tiled(
    network: Callable[[torch.Tensor], torch.Tensor],
    pixels: torch.Tensor,
    scale: int,
    tile: int | None,
    overlap: int,
) -> torch.Tensor:
    """`network` on (N, C, H, W) `pixels`, whole when both sides fit in `tile`, else tile by tile: each
    tile's input reaches `overlap` pixels past its edges (inside the image) and only its own region of
    the output is kept."""
    height, width = pixels.shape[-2:]
    if tile is None or (height <= tile and width <= tile):
        return network(pixels)
    out = pixels.new_empty((*pixels.shape[:2], height * scale, width * scale))
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            bottom, right = min(top + tile, height), min(left + tile, width)
            y0, x0 = max(top - overlap, 0), max(left - overlap, 0)
            y1, x1 = min(bottom + overlap, height), min(right + overlap, width)
            piece = network(pixels[:, :, y0:y1, x0:x1])
            dy, dx = (top - y0) * scale, (left - x0) * scale
            out[:, :, top * scale : bottom * scale, left * scale : right * scale] = piece[
                :, :, dy : dy + (bottom - top) * scale, dx : dx + (right - left) * scale
            ]
    return out


class UpscaleStage:
    """The `upscale` stage: the live draws of each chunk enlarged on the device; a dropped draw stays a
    blank of the new size that nothing writes."""

    section = "upscale"
    needs = ("images",)
    adds = ()
    changes_pixels = True
    columns = STAGE_ROWS["upscale"].columns  # the table's: the driver reserves them (core/carry.py)

    def __init__(self, upscaler: Upscaler):
        self.upscaler = upscaler
        self.recorded = {
            "upscaler": upscaler.name,
            "upscaler_sha256": upscaler.sha256,
            "upscale_scale": upscaler.scale,
            "upscale_tile": upscaler.tile,
        }

    @classmethod
    def from_spec(cls, spec: JobSpec, context: StageContext) -> Self | None:
        section = spec.upscale
        if section is None:
            return None
        source = Pretrained.of(section, "upscale")
        return cls(Upscaler(source, section.dtype, section.tile, section.tile_overlap, context.device))

    def run(self, batch: DrawBatch) -> None:
        images, scale = batch.images, self.upscaler.scale
        count, height, width, channels = images.shape
        larger = torch.zeros(
            (count, height * scale, width * scale, channels), dtype=images.dtype, device=images.device
        )
        live = batch.live  # a dropped draw is upscaled by no one
        if live:
            at = torch.tensor(live, device=images.device)
            larger[at] = self.upscaler(images[at])
            for i in live:
                batch.columns[i].update(self.recorded)
        batch.images = larger
