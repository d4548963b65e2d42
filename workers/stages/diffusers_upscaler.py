"""`upscale: {kind: diffusers}`: diffusers' prompt-guided upscalers as the `upscale` stage's model.

`StableDiffusionUpscalePipeline` (x4: denoises latents of the image's own size, conditioned on the
low-resolution image with `noise_level` added, decoded by a VAE of scale 4) and
`StableDiffusionLatentUpscalePipeline` (x2: the image's latents enlarged and denoised), told apart by
the class in the pipeline's model_index.json and loaded through workers/loading.py's `Pretrained`
(safetensors only unless the section says otherwise). A chunk of draws is one pipeline call, batched:
each row's prompt guides its image, and each row's noise comes from a CPU generator seeded with its
draw seed alone, so a row's image does not depend on the actor, the shard order or a resume (within
one batch layout, as generation's: docs/ARCHITECTURE.md, Determinism).

Not tiled: the UNet's attention spans the whole latent, so tiles would not equal the whole image's
result; an image with a side over `tile` is refused (its rows `model_rejected`) instead.
"""

from __future__ import annotations

from typing import Any

import torch

from imagemill.core.errors import ImagemillError
from imagemill.core.spec.sections import UpscaleSpec
from imagemill.provenance.model_hash import model_hash
from imagemill.workers.loading import Pretrained

PIPELINES = {"StableDiffusionUpscalePipeline": 4, "StableDiffusionLatentUpscalePipeline": 2}


class DiffusersUpscaler:
    """A diffusers upscaler pipeline on the actor's device, and what the metadata says of it."""

    def __init__(self, source: Pretrained, section: UpscaleSpec, device: str):
        from diffusers import DiffusionPipeline

        pipe = source.weights(DiffusionPipeline, dtype=getattr(torch, section.dtype))
        kind = type(pipe).__name__
        if kind not in PIPELINES:
            raise ImagemillError(
                f"{source.setting} {source.source}: a {kind}, not an upscaler ({' or '.join(PIPELINES)}); "
                "for a super-resolution network's model.safetensors set upscale.kind: spandrel"
            )
        self.options: dict[str, Any] = {}
        if kind == "StableDiffusionUpscalePipeline":
            self.options["noise_level"] = section.noise_level
        elif "noise_level" in section.model_fields_set:
            raise ImagemillError(
                f"upscale.noise_level: {source.source} is a {kind}, which adds no noise level; remove it"
            )
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(device)
        self.dtype = getattr(torch, section.dtype)
        self.scale = PIPELINES[kind]
        self.name = source.source
        self.sha256 = model_hash(source.local)  # every file of the pipeline's directory
        self.tile = section.tile
        self.steps = section.num_inference_steps
        self.guidance_scale = section.guidance_scale

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, texts: list[str], seeds: list[int]) -> torch.Tensor:
        """(N, H, W, 3) uint8 images → (N, H·scale, W·scale, 3) uint8, on their device; ValueError (the
        rows' `model_rejected`) for an image larger than `tile`."""
        height, width = images.shape[1:3]
        if self.tile is not None and max(height, width) > self.tile:
            raise ValueError(
                f"upscale.tile: a {width}x{height} image is over {self.tile} px a side, and a diffusers "
                "upscaler runs whole images: raise upscale.tile, or set it to null"
            )
        pixels = images.permute(0, 3, 1, 2).to(self.dtype) / 255  # [0, 1]: the pipeline normalises it
        larger = self.pipe(
            prompt=texts,
            image=pixels,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance_scale,
            generator=[torch.Generator().manual_seed(seed) for seed in seeds],
            output_type="pt",
            **self.options,
        ).images
        return (larger.float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
