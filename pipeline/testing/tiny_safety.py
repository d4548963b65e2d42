"""A tiny random-weight safety checker (diffusers' `StableDiffusionSafetyChecker`) whose flags tests set.

`make_tiny_safety_checker(out_dir, clip_dir, threshold)` writes a checker directory that loads as a
real one does (config.json, model.safetensors, preprocessor_config.json). Only concept 0 can flag: its
embedding is a seeded random direction with cosine threshold `threshold`; the other 16 concepts and
the 3 special-care ones have threshold NEVER, out of a cosine's reach. So an image's `safety_score`
is cos(image, concept 0) − threshold, and a test that has read the cosines of its images once (a run
with threshold 0 records them as the scores) chooses a threshold that flags exactly the rows it wants.

It is built on a `make_tiny_clip` model (`clip_dir`): its config and image processor, and with
`share_tower` its vision tower and projection weights too, so a job scoring with that CLIP reuses the
scorer's image embeddings; without, the tower is seeded random weights of the same shape.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import CLIPConfig, CLIPModel

from imagemill.testing.tiny_model import SEED

NEVER = 10.0  # a cosine threshold no image reaches: the concept never flags
PROCESSOR_CONFIG = "preprocessor_config.json"


def make_tiny_safety_checker(
    out_dir: str | os.PathLike, clip_dir: str | os.PathLike, threshold: float = 0.0, share_tower: bool = True
) -> Path:
    """Write the checker to `out_dir`; images whose cosine with concept 0 exceeds `threshold` flag."""
    out, clip_path = Path(out_dir), Path(clip_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED + 1)
        checker = StableDiffusionSafetyChecker(CLIPConfig.from_pretrained(clip_path))
        concepts = torch.randn_like(checker.concept_embeds)
    if share_tower:
        clip = CLIPModel.from_pretrained(clip_path)
        checker.vision_model.load_state_dict(clip.vision_model.state_dict())
        checker.visual_projection.load_state_dict(clip.visual_projection.state_dict())
    with torch.no_grad():
        checker.concept_embeds.copy_(concepts)
        checker.concept_embeds_weights.fill_(NEVER)
        checker.concept_embeds_weights[0] = threshold
        checker.special_care_embeds_weights.fill_(NEVER)
    checker.save_pretrained(out, safe_serialization=True)
    shutil.copy(clip_path / PROCESSOR_CONFIG, out / PROCESSOR_CONFIG)
    return out
