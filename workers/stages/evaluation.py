"""The evaluation's feature model (`evaluation:`): each image's embedding, on the actor's device, in the
same batch pass as the CLIP score and before the copy back, so later passes read no image.

`evaluation.features` picks the kind (FEATURE_KINDS):
- clip: a CLIP model's projected image embeddings (`CLIPModel.get_image_features`, loaded through
  `loading.Pretrained`), with the image processor config's transform as torch ops
  (`clip_input.ClipImageInput`, shared with the scorer and the safety checker). A CLIP tower has no
  classifier head, so no Inception Score comes from it.
- pixels: the image itself, small (PixelFeatures): needs no weights, so diversity and near-duplicates
  work where no trained feature model exists (the demo model's world, smoke tests).
- inception: the FID Inception-v3's pool features (stages/inception.py); its classifier head gives
  each shard the Inception Score's sums (imagemill.core.inception_score).
`write_features` writes a shard's embeddings and feature sums (imagemill.core.features) before its commit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch

from imagemill.core.features import JOB_WIDE, FeatureSums, embeddings_table, sums_table
from imagemill.core.inception_score import ClassSums
from imagemill.core.layout import OutputLayout, parquet_bytes
from imagemill.core.spec import EvaluationSpec
from imagemill.core.write_gate import ShardAttempt
from imagemill.workers.console import quiet_model_libraries
from imagemill.workers.loading import Pretrained
from imagemill.workers.stages.clip_input import ClipImageInput
from imagemill.workers.stages.contract import DrawBatch, ModelStage
from imagemill.workers.stages.inception import InceptionFeatures


class Features(Protocol):
    dim: int

    def embed(self, images: torch.Tensor) -> np.ndarray: ...


class ClipFeatures:
    def __init__(self, spec: EvaluationSpec, device: str):
        # transformers is imported here so the driver never pays for importing it.
        from transformers import CLIPImageProcessorPil, CLIPModel

        quiet_model_libraries()
        source = Pretrained.of(spec, "evaluation")
        self.model = source.weights(CLIPModel, dtype=getattr(torch, spec.dtype))
        self.model.to(device).eval()
        self.image_input = ClipImageInput.of(source.files(CLIPImageProcessorPil))
        self.dim: int = self.model.config.projection_dim

    @torch.inference_mode()
    def embed(self, images: torch.Tensor) -> np.ndarray:
        """(N, H, W, 3) uint8 images, on any device → their (N, dim) float32 embeddings, on the CPU."""
        pixels = self.image_input(images, self.model.dtype)
        features = self.model.get_image_features(pixel_values=pixels).pooler_output
        return features.float().cpu().numpy()


class PixelFeatures:
    """The image downscaled to SIDE x SIDE RGB by area averaging (antialiased, so the embedding follows
    the picture's layout rather than single pixels), flattened, and centred on its own mean so that
    cosine distance compares structure, not overall brightness. A plain-coloured image is the zero
    vector (distance 1 to everything)."""

    SIDE = 16

    def __init__(self, spec: EvaluationSpec, device: str):
        self.dim: int = 3 * self.SIDE * self.SIDE

    @torch.inference_mode()
    def embed(self, images: torch.Tensor) -> np.ndarray:
        """(N, H, W, 3) uint8 images, on any device → their (N, dim) float32 embeddings, on the CPU."""
        pixels = images.permute(0, 3, 1, 2).float() / 255
        small = torch.nn.functional.interpolate(pixels, size=(self.SIDE, self.SIDE), mode="area")
        flat = small.reshape(len(images), -1)
        return (flat - flat.mean(dim=1, keepdim=True)).cpu().numpy()


FEATURE_KINDS: dict[str, Callable[[EvaluationSpec, str], Features]] = {
    "clip": ClipFeatures,
    "pixels": PixelFeatures,
    "inception": InceptionFeatures,
}


class FeatureModel:
    """The feature model `evaluation.features` names, as the actor and the reference's embedding use it."""

    def __init__(self, spec: EvaluationSpec, device: str):
        self.features = FEATURE_KINDS[spec.features](spec, device)
        self.dim: int = self.features.dim

    def embed(self, images: torch.Tensor) -> np.ndarray:
        """(N, H, W, 3) uint8 images, on any device → their (N, dim) float32 embeddings, on the CPU."""
        return self.features.embed(images)

    def class_logits(self, features: np.ndarray) -> np.ndarray | None:
        """The classifier head's logits of `embed`'s features (the Inception Score's); None without one."""
        head = getattr(self.features, "class_logits", None)
        return None if head is None else head(features)


class FeatureStage(ModelStage):
    """The `features` stage: each draw's embedding by the feature model, kept for the written image
    and written before the shard's commit (`write_features`)."""

    section = "evaluation"
    load = FeatureModel
    model: FeatureModel
    needs = ("images",)
    adds = ("features",)
    changes_pixels = False
    columns = ()

    def run(self, batch: DrawBatch) -> None:
        live = batch.live  # a dropped draw is embedded by no one
        if live:
            at = torch.tensor(live, device=batch.images.device)
            for i, features in zip(live, self.model.embed(batch.images[at]), strict=True):
                batch.features[i] = features


def write_features(
    attempt: ShardAttempt,
    ids: list[str],
    labels: list[str | None],
    features: np.ndarray,
    model: FeatureModel,
) -> None:
    """A shard's embeddings file and feature-sums file (job-wide and per label, with the Inception
    Score's sums when the model has a classifier head), staged in the shard's attempt."""
    logits = model.class_logits(features)
    groups = {JOB_WIDE: list(range(len(ids)))}
    for label in sorted({label for label in labels if label is not None}):
        groups[label] = [index for index, value in enumerate(labels) if value == label]
    sums = {}
    for label, rows in groups.items():
        sums[label] = FeatureSums.empty(features.shape[1])
        sums[label].add(features[rows])
        if logits is not None:
            sums[label].classes = ClassSums.of_logits(logits[rows])
    for path, table in (
        (OutputLayout.embeddings_path(attempt.shard_id), embeddings_table(ids, labels, features)),
        (OutputLayout.feature_stats_path(attempt.shard_id), sums_table(sums)),
    ):
        attempt.write(path, parquet_bytes(table))
