"""`model.kind: none`, enhance-only: no model; each row's source image (`input.image_column`, read,
checked and brought to the row's size by workers/source_images.py like image-to-image's, or kept at its
own size by `generation.resize: keep`) is its draw, so the stages after generation (safety, upscale,
watermark, encode) run on the user's own images."""

from __future__ import annotations

import torch

from imagemill.core.spec import JobSpec
from imagemill.workers.generators.contract import BatchKey


class SourceAsDraw:
    stage_timer = None  # no model stages to split
    scheduler_name = a1111_sampler = None  # no diffusers scheduler to name
    token_slices = 1  # one process draws each image

    @classmethod
    def from_spec(cls, spec: JobSpec, device: str) -> SourceAsDraw:
        return cls()

    def truncated(self, prompts: list[str | None]) -> list[bool]:
        return [False] * len(prompts)

    def generate(
        self,
        prompts: list[str | None],
        negative_prompts: list[str | None],
        seeds: list[int],
        key: BatchKey,
        sources: torch.Tensor,
    ) -> torch.Tensor:
        """The sources themselves, (N, H, W, 3) uint8 on the device (the spec requires image_column)."""
        return sources
