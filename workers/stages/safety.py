"""The safety filter (`safety:`): a CLIP-based concept classifier run on every image on the actor's
device, before the copy back.

The classifier is diffusers' `StableDiffusionSafetyChecker` (the one Stable Diffusion pipelines ship):
a CLIP vision tower and projection, 17 concept embeddings and 3 "special care" ones, each with a
cosine threshold. Its own `forward` blacks images out and returns one bool per image; here the same
arithmetic (its `forward_onnx`, vectorised) gives what the metadata records instead: per concept,
margin = cosine(image, concept) − threshold (+ 0.01 on every concept once a special-care concept is
over its threshold); as in diffusers, an image is flagged when a concept's margin is > 0 (special-care
concepts only tighten the others). `safety_score` is the highest concept margin, so it is comparable
across images and its sign says flagged.

When the job's CLIP scorer has the same vision tower and projection (same weights, same image
processor numbers), the scorer's image embeddings are used and the checker's tower is not run again.
The stage applies the final policy to the batch it hands on, on the device: a flagged draw is blurred
(`blur`) or blanked and marked dropped (`drop`) here, so that no later stage (evaluation features, an
upscaler, the copy back, best-of-N, the report's thumbnails, the encoder) ever sees its drawn pixels.
Which of a row's draws is kept, and drawing again (`retry`), is selection.py's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Self

import torch
import torch.nn.functional as F

from imagemill.core.spec import JobSpec, SafetySpec
from imagemill.workers.console import quiet_model_libraries
from imagemill.workers.loading import Pretrained
from imagemill.workers.stages.clip_input import ClipImageInput
from imagemill.workers.stages.contract import DrawBatch, StageContext
from imagemill.workers.stages.scoring import ClipScorer, ScoringStage

SPECIAL_CARE_ADJUSTMENT = 0.01  # diffusers' own: a special-care hit makes every concept stricter
BLUR_CELLS = 8  # a blurred image keeps this many cells along its shorter side: shapes, no detail


@dataclass(frozen=True)
class Verdict:
    score: float  # the highest concept margin; > 0: flagged
    concepts: tuple[str, ...]  # the concepts over their threshold, concept_<i> (the checker's order)

    @property
    def flagged(self) -> bool:
        return self.score > 0


class SafetyChecker:
    def __init__(self, spec: SafetySpec, device: str, scorer: ClipScorer | None = None):
        # diffusers and transformers are imported here so the driver never pays for importing them.
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessorPil

        quiet_model_libraries()
        source = Pretrained.of(spec, "safety")
        self.model = source.weights(StableDiffusionSafetyChecker, dtype=getattr(torch, spec.dtype))
        self.model.to(device).eval()
        self.image_input = ClipImageInput.of(source.files(CLIPImageProcessorPil))
        self.reuses_scorer = scorer is not None and self._same_tower(scorer)

    def _same_tower(self, scorer: ClipScorer) -> bool:
        """Whether the scorer's image embeddings are this checker's: same input, tower and projection."""
        if scorer.image_input != self.image_input or scorer.model.dtype != self.model.dtype:
            return False
        pairs = [
            (self.model.vision_model, scorer.model.vision_model),
            (self.model.visual_projection, scorer.model.visual_projection),
        ]
        for mine, theirs in pairs:
            ours, other = mine.state_dict(), theirs.state_dict()
            if ours.keys() != other.keys() or not all(torch.equal(ours[k], other[k]) for k in ours):
                return False
        return True

    @torch.inference_mode()
    def check(self, images: torch.Tensor, clip_embeddings: torch.Tensor | None = None) -> list[Verdict]:
        """One verdict per (N, H, W, 3) uint8 image; `clip_embeddings`: the scorer's embeddings of the
        same images, used when `reuses_scorer`."""
        if self.reuses_scorer and clip_embeddings is not None:
            embeddings = clip_embeddings
        else:
            pooled = self.model.vision_model(self.image_input(images, self.model.dtype)).pooler_output
            embeddings = self.model.visual_projection(pooled)
        unit = F.normalize(embeddings.float(), dim=-1)
        special = unit @ F.normalize(self.model.special_care_embeds.float(), dim=-1).T
        special = special - self.model.special_care_embeds_weights.float()
        concepts = unit @ F.normalize(self.model.concept_embeds.float(), dim=-1).T
        adjustment = (special > 0).any(dim=1, keepdim=True) * SPECIAL_CARE_ADJUSTMENT
        concepts = concepts - self.model.concept_embeds_weights.float() + adjustment
        margins = concepts.cpu()
        names = [f"concept_{i}" for i in range(concepts.shape[1])]
        return [
            Verdict(
                float(row.max()),
                tuple(name for name, margin in zip(names, row.tolist(), strict=True) if margin > 0),
            )
            for row in margins
        ]


class SafetyStage:
    """The `safety` stage: each draw's verdict, from the scorer's embeddings where the towers match,
    and the final policy applied to the flagged draws' pixels: blurred (`blur`), or blanked and marked
    dropped (`drop`); `keep` leaves them. With `retry` a flagged draw may still lose to a later round's
    unflagged one (selection.py); if it is kept, it is kept as the policy after the last round says.
    Applying it to every flagged draw is the same thing: a flagged draw is only ever written that way."""

    section = "safety"
    needs = ("images",)
    adds = ("verdicts", "dropped")
    changes_pixels = True  # a flagged draw leaves this stage blurred or blanked
    columns = ("safety_score", "safety_concepts")

    def __init__(self, checker: SafetyChecker, policy: str):
        self.checker = checker
        self.policy = policy  # keep | blur | drop: SafetySpec.final_policy

    @classmethod
    def from_spec(cls, spec: JobSpec, context: StageContext) -> Self | None:
        if spec.safety is None:
            return None
        scoring = context.built.get("score")
        scorer = scoring.model if isinstance(scoring, ScoringStage) else None
        return cls(SafetyChecker(spec.safety, context.device, scorer), spec.safety.final_policy)

    def run(self, batch: DrawBatch) -> None:
        batch.verdicts = list(self.checker.check(batch.images, batch.clip_embeddings))
        flagged = [i for i, verdict in enumerate(batch.verdicts) if verdict.flagged]
        if not flagged or self.policy == "keep":
            return
        with torch.inference_mode():
            images = batch.images.clone()
            at = torch.tensor(flagged, device=images.device)
            images[at] = blur(images[at]) if self.policy == "blur" else 0
        batch.images = images
        if self.policy == "drop":
            for i in flagged:
                batch.dropped[i] = True


def blur(images: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 images made unrecognisable: averaged into BLUR_CELLS cells along the shorter
    side, then smoothly enlarged back. Deterministic; runs wherever the images are."""
    pixels = images.permute(0, 3, 1, 2).float()
    height, width = pixels.shape[-2:]
    cells = (
        max(1, BLUR_CELLS * height // min(height, width)),
        max(1, BLUR_CELLS * width // min(height, width)),
    )
    small = F.adaptive_avg_pool2d(pixels, cells)
    smooth = F.interpolate(small, size=(height, width), mode="bilinear", align_corners=False)
    return smooth.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
