"""The CLIP score (`scoring:`): how well each image matches the text it was generated from, by a CLIP model.

score = 100 × cosine(image embedding, text embedding), in [-100, 100]. This is torchmetrics'
`CLIPScore` scale without its clamp at 0 (Hessel et al.'s CLIPScore is 2.5 × max(cos, 0)): the raw
cosine keeps the whole distribution visible, so a threshold can be chosen from it. CLIP ViT-L/14 gives
matching text-image pairs about 25..35 on this scale.

The images are scored where the generator left them, on the actor's device, before the copy back,
prepared by `ClipPixels` (the image processor config's transform as torch ops; clip_pixels.py).
Text embeddings are cached per distinct text (`TextEmbeddingCache`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from imagemill.spec import ScoringSpec
from imagemill.workers.console import quiet_model_libraries
from imagemill.workers.loading import Pretrained
from imagemill.workers.stages.clip_pixels import ClipPixels
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
        # The processor class only reads the numbers from the config; the transforms are ours.
        self.pixel_values = ClipPixels(source.files(CLIPImageProcessorPil), device, self.model.dtype)
        self.max_length: int = self.model.config.text_config.max_position_embeddings
        self.texts = TextEmbeddingCache(self._encode_texts)

    def _encode_texts(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Unit-length text embeddings; prompts longer than the text encoder takes are cut, as in CLIP."""
        tokens = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        return {"text": F.normalize(self.model.get_text_features(**tokens).pooler_output.float(), dim=-1)}

    @torch.inference_mode()
    def score(self, images: torch.Tensor, texts: list[str]) -> list[float]:
        """The score of each image against its text (see the module docstring for the scale)."""
        features = self.model.get_image_features(pixel_values=self.pixel_values(images)).pooler_output
        cosine = (F.normalize(features.float(), dim=-1) * self.texts(texts)["text"]).sum(dim=-1)
        return (100 * cosine).tolist()
