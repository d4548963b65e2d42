"""The CLIP score (`scoring:`): how well each image matches the text it was generated from, by a CLIP model.

score = 100 × cosine(image embedding, text embedding), in [-100, 100]. This is torchmetrics'
`CLIPScore` scale without its clamp at 0 (Hessel et al.'s CLIPScore is 2.5 × max(cos, 0)): the raw
cosine keeps the whole distribution visible, so a threshold can be chosen from it. CLIP ViT-L/14 gives
matching text-image pairs about 25..35 on this scale.

The images are scored where the generator left them, on the actor's device, before the copy back
(their model input is made as clip_input.py says). Text embeddings are cached per distinct text
(`TextEmbeddingCache`). The image embeddings are kept as `image_embeddings` and given to the safety
checker, which uses them instead of computing its own when its CLIP vision tower is this one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from imagemill.core.spec import ScoringSpec
from imagemill.workers.console import quiet_model_libraries
from imagemill.workers.loading import Pretrained
from imagemill.workers.stages.clip_input import ClipImageInput
from imagemill.workers.stages.contract import DrawBatch, ModelStage
from imagemill.workers.text_cache import TextEmbeddingCache


class ClipScorer:
    def __init__(self, spec: ScoringSpec, device: str):
        # transformers is imported here so the driver never pays for importing it.
        from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

        quiet_model_libraries()
        source = Pretrained.of(spec, "scoring")
        self.device = device
        self.model = source.weights(CLIPModel, dtype=getattr(torch, spec.dtype))
        self.model.to(device).eval()
        self.tokenizer = source.files(AutoTokenizer)
        # The processor class only reads the numbers from the config; the transforms are ours, below.
        self.image_input = ClipImageInput.of(source.files(CLIPImageProcessorPil))
        self.max_length: int = self.model.config.text_config.max_position_embeddings
        self.texts = TextEmbeddingCache(self._encode_texts)

    def _encode_texts(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Unit-length text embeddings; prompts longer than the text encoder takes are cut, as in CLIP."""
        tokens = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        return {"text": F.normalize(self.model.get_text_features(**tokens).pooler_output.float(), dim=-1)}

    @torch.inference_mode()
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """The (N, projection_dim) CLIP image embeddings of (N, H, W, 3) uint8 images, not normalised."""
        pixels = self.image_input(images, self.model.dtype)
        return self.model.get_image_features(pixel_values=pixels).pooler_output

    def score(self, images: torch.Tensor, texts: list[str]) -> list[float]:
        """The score of each (N, H, W, 3) uint8 image against its text (see the module docstring)."""
        return self.score_embeddings(self.image_embeddings(images), texts)

    @torch.inference_mode()
    def score_embeddings(self, embeddings: torch.Tensor, texts: list[str]) -> list[float]:
        """The scores of images given by their `image_embeddings`."""
        cosine = (F.normalize(embeddings.float(), dim=-1) * self.texts(texts)["text"]).sum(dim=-1)
        return (100 * cosine).tolist()


class ScoringStage(ModelStage):
    """The `score` stage: each draw's CLIP score, and the image embeddings the safety stage may reuse."""

    section = "scoring"
    load = ClipScorer
    model: ClipScorer
    needs = ("images", "rows")
    adds = ("clip_embeddings", "clip_scores")
    changes_pixels = False
    columns = ("clip_score",)

    def run(self, batch: DrawBatch) -> None:
        batch.clip_embeddings = self.model.image_embeddings(batch.images)
        batch.clip_scores = list(self.model.score_embeddings(batch.clip_embeddings, batch.texts))
