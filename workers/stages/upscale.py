"""Super-resolution (`upscale:`): each kept draw enlarged on the device, after the safety stage (a
flagged draw is upscaled blurred, a dropped one not at all) and before the evaluation features, the
copy back and the encoder, which then all see the upscaled image. The model is a single-image SR
network (`kind: spandrel`, below) or a diffusers upscaler pipeline (`kind: diffusers`,
diffusers_upscaler.py); both are called on a chunk's live draws with their prompts and seeds.

A row may ask for a smaller scale than the model's (`input.scale_column`; a divisor of it): the
model's output is then reduced by area averaging over (model scale / row scale)² pixels, a fixed box
filter, rather than refused, so one job can write x2 and x4 images from one x4 model.

The spandrel network is a safetensors state dict (`model.safetensors` in the section's source, fetched through
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
from typing import Any, Protocol, Self

import torch
import torch.nn.functional as F

from imagemill.core.errors import ImagemillError
from imagemill.core.spec import JobSpec
from imagemill.core.stage_table import STAGE_ROWS
from imagemill.workers.loading import Pretrained
from imagemill.workers.stages.contract import DrawBatch, StageContext
from imagemill.workers.stages.diffusers_upscaler import DiffusersUpscaler

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


class Upscaler(Protocol):
    """An upscale model on the actor's device, and what the metadata says of it."""

    name: str
    sha256: str | None
    scale: int
    tile: int | None

    def __call__(self, images: torch.Tensor, texts: list[str], seeds: list[int]) -> torch.Tensor:
        """(N, H, W, 3) uint8 → (N, H·scale, W·scale, 3) uint8, each draw guided by its prompt and seed
        where the model takes them."""
        ...


class SpandrelUpscaler:
    """`kind: spandrel`: the network of an `upscale:` section on the actor's device."""

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
    def __call__(self, images: torch.Tensor, texts: list[str], seeds: list[int]) -> torch.Tensor:
        """(N, H, W, 3) uint8 images → (N, H·scale, W·scale, 3) uint8, on their device (a network
        takes no prompt and draws no noise)."""
        pixels = images.permute(0, 3, 1, 2).to(self.network.dtype) / 255

        def network(piece: torch.Tensor) -> torch.Tensor:  # each tile's output to levels at once
            return levels(self.network(piece))

        larger = tiled(network, pixels, self.scale, self.tile, self.overlap)
        return larger.permute(0, 2, 3, 1).contiguous()


def levels(pixels: torch.Tensor) -> torch.Tensor:
    """A network's (N, C, H, W) output on 0..1 as uint8 levels. Taken per tile, so that the whole
    output is held as uint8 (3 bytes a pixel), never as floats: with `resize: keep` an image may be
    as large as `input.max_image_pixels`, and its float output (and the temporaries of converting it)
    would be several times the uint8 one on the device."""
    return (pixels.float() * 255).round().clamp(0, 255).to(torch.uint8)


def tiled(
    network: Callable[[torch.Tensor], torch.Tensor],
    pixels: torch.Tensor,
    scale: int,
    tile: int | None,
    overlap: int,
) -> torch.Tensor:
    """`network` on (N, C, H, W) `pixels`, whole when both sides fit in `tile`, else tile by tile: each
    tile's input reaches `overlap` pixels past its edges (inside the image) and only its own region of
    the output is kept, in the dtype `network` returns."""
    height, width = pixels.shape[-2:]
    if tile is None or (height <= tile and width <= tile):
        return network(pixels)
    out: torch.Tensor | None = None
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            bottom, right = min(top + tile, height), min(left + tile, width)
            y0, x0 = max(top - overlap, 0), max(left - overlap, 0)
            y1, x1 = min(bottom + overlap, height), min(right + overlap, width)
            piece = network(pixels[:, :, y0:y1, x0:x1])
            if out is None:
                out = piece.new_empty((*piece.shape[:2], height * scale, width * scale))
            dy, dx = (top - y0) * scale, (left - x0) * scale
            out[:, :, top * scale : bottom * scale, left * scale : right * scale] = piece[
                :, :, dy : dy + (bottom - top) * scale, dx : dx + (right - left) * scale
            ]
    assert out is not None  # a tile at least: the image has pixels
    return out


def reduced(images: torch.Tensor, factor: int) -> torch.Tensor:
    """(N, H, W, 3) uint8 → (N, H/factor, W/factor, 3): each output pixel the rounded mean of its
    factor x factor block (a box filter: no ringing, the same bytes on every device)."""
    if factor == 1:
        return images
    pixels = images.permute(0, 3, 1, 2).float()
    mean = F.avg_pool2d(pixels, factor)
    return mean.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def scale_problem(wanted: int, scale: int) -> str | None:
    """Why a row cannot be upscaled `wanted` times by a model of `scale`, or None."""
    if scale % wanted:
        divisors = [str(d) for d in range(1, scale + 1) if scale % d == 0 and d > 1]
        return (
            f"upscale: scale {wanted} is not one the upscaler (x{scale}) gives: use {' or '.join(divisors)}"
        )
    return None


class UpscaleStage:
    """The `upscale` stage: the live draws of each chunk enlarged on the device; a dropped draw stays a
    blank of the new size that nothing writes. All draws of a chunk share their scale (the row's
    `scale` is part of its BatchKey)."""

    section = "upscale"
    needs = ("images",)
    adds = ()
    changes_pixels = True
    columns = STAGE_ROWS["upscale"].column_names  # the table's: the driver reserves them (core/carry.py)

    def __init__(self, upscaler: Upscaler):
        self.upscaler = upscaler
        self.recorded = {
            "upscaler": upscaler.name,
            "upscaler_sha256": upscaler.sha256,
            "upscale_tile": upscaler.tile,
        }

    @classmethod
    def from_spec(cls, spec: JobSpec, context: StageContext) -> Self | None:
        section = spec.upscale
        if section is None:
            return None
        source = Pretrained.of(section, "upscale")
        if section.kind == "diffusers":
            return cls(DiffusersUpscaler(source, section, context.device))
        return cls(
            SpandrelUpscaler(source, section.dtype, section.tile, section.tile_overlap, context.device)
        )

    def run(self, batch: DrawBatch) -> None:
        """Raises ValueError (the batch's rows `model_rejected`) for a scale the model does not give."""
        images, model_scale = batch.images, self.upscaler.scale
        scale = batch.rows[0].scale or model_scale
        problem = scale_problem(scale, model_scale)
        if problem:
            raise ValueError(problem)
        count, height, width, channels = images.shape
        larger = torch.zeros(
            (count, height * scale, width * scale, channels), dtype=images.dtype, device=images.device
        )
        live = batch.live  # a dropped draw is upscaled by no one
        if live:
            texts = [batch.rows[i].text or "" for i in live]  # enhance-only rows may have no prompt
            seeds = [batch.seeds[i] for i in live]
            at = torch.tensor(live, device=images.device)
            larger[at] = reduced(self.upscaler(images[at], texts, seeds), model_scale // scale)
            for i in live:
                batch.columns[i].update(self.recorded, upscale_scale=scale)
        batch.images = larger
