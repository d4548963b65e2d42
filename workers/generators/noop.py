"""A generator with no model: each image is a solid colour taken from the row's seed.

It measures what the machinery around the model moves per second (read, validate, encode, write:
the pipeline's ceiling), and lets the memory benchmark push a million rows through in minutes.
"""

from __future__ import annotations

import numpy as np
import torch

from imagemill.core.spec import JobSpec
from imagemill.workers.generators.contract import BatchKey


class NoopGenerator:
    stage_timer = None  # no model stages to split
    scheduler_name = a1111_sampler = None  # no diffusers scheduler to name
    token_slices = 1  # one process draws each image

    @classmethod
    def from_spec(cls, spec: JobSpec, device: str) -> NoopGenerator:
        return cls()

    def truncated(self, prompts: list[str]) -> list[bool]:
        return [False] * len(prompts)

    def generate(
        self, prompts: list[str], negative_prompts: list[str | None], seeds: list[int], key: BatchKey
    ) -> torch.Tensor:
        colours = np.array(
            [[seed >> 16 & 255, seed >> 8 & 255, seed & 255] for seed in seeds], dtype=np.uint8
        )
        return torch.from_numpy(colours)[:, None, None, :].expand(len(seeds), key.height, key.width, 3)
