"""A tiny random-weight super-resolution network that spandrel recognises: Real-ESRGAN's Compact
(SRVGGNetCompact) layout, written as the state dict a trained one is, in `model.safetensors`.

Its output is the nearest-neighbour enlargement plus a small seeded residual of `convs + 2` 3x3
convolutions, so its receptive field reaches `convs + 2` input pixels: a tile overlap of that or more
gives tiles identical to the whole image's result. Built by hand (no spandrel import): the test then
loads it through the job's real path, where spandrel must recognise it from its keys alone.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from imagemill.testing.tiny_model import SEED


def make_tiny_upscaler(out_dir: str | os.PathLike, scale: int = 2, features: int = 8, convs: int = 2) -> Path:
    """Write `out_dir/model.safetensors`, a Compact network enlarging `scale` times; returns `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(SEED + scale)

    def conv(index: int, outputs: int, inputs: int) -> dict[str, torch.Tensor]:
        weight = torch.randn(outputs, inputs, 3, 3, generator=generator) * 0.05
        return {f"body.{index}.weight": weight, f"body.{index}.bias": torch.zeros(outputs)}

    def prelu(index: int) -> dict[str, torch.Tensor]:
        return {f"body.{index}.weight": torch.full((features,), 0.25)}

    state = {**conv(0, features, 3), **prelu(1)}
    for k in range(convs):
        state |= {**conv(2 + 2 * k, features, features), **prelu(3 + 2 * k)}
    state |= conv(2 + 2 * convs, 3 * scale * scale, features)
    save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(out / "model.safetensors"))
    return out
