"""Image-to-image for a loaded diffusers pipeline: its family's image-to-image or inpainting pipeline,
sharing its weights.

diffusers' `AutoPipelineForImage2Image.from_pipe` (and `AutoPipelineForInpainting.from_pipe`) builds
the image-to-image (inpainting) class of the pipeline's family (StableDiffusionImg2ImgPipeline or
StableDiffusionInpaintPipeline for StableDiffusionPipeline, and so on) from the same components: no
second copy of the weights, and the LoRAs, quantisation and speed options already applied to them
hold. It takes the same text embeddings as the text-to-image pipeline, so the generator's embedding
cache serves both. A text-to-image model's 4-channel denoiser inpaints by blending: after each step
the latents outside the mask are replaced by the source's, noised to that step (the last step's: the
source's own), so only the VAE's round trip changes them; `paste_back` then puts the source's exact
pixels there (docs/inpainting.md).
"""

from __future__ import annotations

from typing import Any

import torch

from imagemill.core.errors import ImagemillError


def image_to_image_pipeline(pipe: Any, inpainting: bool = False) -> Any:
    """The image-to-image (or inpainting) pipeline of `pipe`'s family, on the same components; a
    family without one is refused in one line."""
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

    auto, kind, setting = (
        (AutoPipelineForInpainting, "inpainting", "input.mask_column")
        if inpainting
        else (AutoPipelineForImage2Image, "image-to-image", "input.image_column")
    )
    try:
        derived = auto.from_pipe(pipe)
    except ValueError:
        raise ImagemillError(
            f"{setting}: {type(pipe).__name__} has no {kind} pipeline in diffusers; "
            f"use a model of a family that has one (SD 1/2, SDXL, SD3, FLUX) or drop {setting}"
        ) from None
    derived.set_progress_bar_config(disable=True)
    return derived


def source_images(sources: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, H, W, 3) uint8 sources as the (N, 3, H, W) [0, 1] tensor diffusers' image processor takes."""
    return sources.permute(0, 3, 1, 2).to(dtype) / 255


def mask_images(masks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, H, W) uint8 masks as the (N, 1, H, W) [0, 1] tensor diffusers' mask processor takes (and cuts
    at half: the pipeline repaints where the blurred mask is at least half)."""
    return masks[:, None].to(dtype) / 255


def paste_back(drawn: torch.Tensor, sources: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The drawn images where the mask repaints, the sources' own pixels where it keeps, and the blurred
    edge a blend of the two: (N, H, W, 3) uint8, on the device."""
    weight = masks[..., None].to(torch.float32) / 255
    blended = sources.to(torch.float32) * (1 - weight) + drawn.to(torch.float32) * weight
    return blended.round().clamp(0, 255).to(torch.uint8)
