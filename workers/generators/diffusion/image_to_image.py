"""Image-to-image for a loaded diffusers pipeline: its family's image-to-image pipeline, sharing its weights.

diffusers' `AutoPipelineForImage2Image.from_pipe` builds the image-to-image class of the pipeline's
family (StableDiffusionImg2ImgPipeline for StableDiffusionPipeline, and so on) from the same
components: no second copy of the weights, and the LoRAs, quantisation and speed options already
applied to them hold. It takes the same text embeddings as the text-to-image pipeline, so the
generator's embedding cache serves both.
"""

from __future__ import annotations

from typing import Any

import torch

from imagemill.core.errors import ImagemillError


def image_to_image_pipeline(pipe: Any) -> Any:
    """The image-to-image pipeline of `pipe`'s family, on the same components; a family without one
    is refused in one line."""
    from diffusers import AutoPipelineForImage2Image

    try:
        img2img = AutoPipelineForImage2Image.from_pipe(pipe)
    except ValueError:
        raise ImagemillError(
            f"input.image_column: {type(pipe).__name__} has no image-to-image pipeline in diffusers; "
            "use a model of a family that has one (SD 1/2, SDXL, SD3, FLUX) or drop input.image_column"
        ) from None
    img2img.set_progress_bar_config(disable=True)
    return img2img


def source_images(sources: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, H, W, 3) uint8 sources as the (N, 3, H, W) [0, 1] tensor diffusers' image processor takes."""
    return sources.permute(0, 3, 1, 2).to(dtype) / 255
