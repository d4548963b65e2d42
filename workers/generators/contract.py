"""What every generator is to the worker: the `Generator` protocol, and the `BatchKey` of its batches.

The worker batches rows that share a `BatchKey` and hands each batch to `generate`; it needs nothing
else from a generator, so a new model kind implements this, gets a row in registry.py, and nothing in
the worker changes. The module imports nothing heavy: the job spec and the registry read it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from imagemill.core.spec import JobSpec
    from imagemill.workers.stage_timer import StageTimer


@dataclass(frozen=True)
class BatchKey:
    """Rows batch together only when every parameter that shapes the computation is the same."""

    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    strength: float | None = None  # image-to-image: the pipeline takes one strength per call
    scale: int | None = None  # upscale: a row's own scale (input.scale_column); a batch has one size


@runtime_checkable
class Generator(Protocol):
    """A model loaded once per actor, on its device, that turns batches of prompts into images."""

    # Splits the model's time into text_encode / denoise / decode for the shard's stats; None when the
    # generator cannot tell its stages apart (the worker then counts all of it as denoise).
    stage_timer: StageTimer | None
    # The metadata's `scheduler`, and A1111's name for it where it has one: diffusers' only, else None.
    scheduler_name: str | None
    a1111_sampler: str | None
    # The processes each image's denoiser tokens are cut over (model.parallel: context in a gang), else 1.
    token_slices: int

    @classmethod
    def from_spec(cls, spec: JobSpec, device: str) -> Generator:
        """Load the model the job's `model:` section names onto `device` (all loading through
        workers/loading.py, so the safetensors rule and the URL copy hold)."""
        ...

    def truncated(self, prompts: list[str]) -> list[bool]:
        """Whether each prompt is longer than the model reads; `generate` then cuts it and the row's
        metadata says `prompt_truncated`."""
        ...

    def generate(
        self, prompts: list[str], negative_prompts: list[str | None], seeds: list[int], key: BatchKey
    ) -> torch.Tensor:
        """One image per prompt, as an (N, key.height, key.width, 3) uint8 tensor on the model's device,
        each drawn from its row's seed alone (None: no negative prompt for that row). A batch the model
        cannot make raises ValueError, which makes its rows `model_rejected` errors. Image-to-image
        (diffusers only; the spec refuses it for other kinds) passes `sources=`, the rows' source
        images as (N, H, W, 3) uint8 on the device, with `key.strength`; inpainting adds `masks=`,
        (N, H, W) uint8 on the device, 0 where the source's pixels are kept as they are."""
        ...
