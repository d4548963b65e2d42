"""A diffusers text-to-image pipeline, loaded once per actor and pinned to its device."""

from __future__ import annotations

import torch

from imagemill.workers.quantization import quantize_denoiser
from imagemill.workers.rows import BatchKey
from imagemill.workers.text_cache import TextEmbeddingCache


class DiffusersGenerator:
    def __init__(
        self,
        source: str,
        dtype: str,
        device: str,
        safetensors_only: bool = True,
        quantization: str = "none",
    ):
        # diffusers is imported here, not at the top, so that the driver never pays for importing it.
        import diffusers
        import transformers

        # Actor output lands in the driver's console, which shows the job's progress: no loading bars,
        # no notices about optional image processors the pipelines never use, and no truncation
        # warnings (truncation is flagged per row in the metadata instead).
        for library in (diffusers, transformers):
            library.utils.logging.disable_progress_bar()
            library.utils.logging.set_verbosity_error()

        self.pipe = diffusers.DiffusionPipeline.from_pretrained(
            source,
            dtype=getattr(torch, dtype),
            # True refuses pickled weights; None prefers safetensors and falls back to them.
            use_safetensors=True if safetensors_only else None,
        )
        self.pipe.to(device)
        quantize_denoiser(self.pipe, quantization, device)
        self.pipe.set_progress_bar_config(disable=True)
        self.device = device
        # Stable Diffusion encodes a negative prompt exactly as it encodes a prompt, so one cache of
        # text → embedding serves both, and the empty negative prompt is encoded once per actor.
        # Other pipelines get the texts and encode them themselves.
        self.embeddings: TextEmbeddingCache | None = (
            TextEmbeddingCache(lambda texts: self.pipe.encode_prompt(texts, self.device, 1, False)[0])
            if isinstance(self.pipe, diffusers.StableDiffusionPipeline)
            else None
        )

    def truncated(self, prompts: list[str]) -> list[bool]:
        """Whether each prompt is longer than the text encoder takes; the pipeline then cuts it."""
        tokenizer = getattr(self.pipe, "tokenizer", None)
        if tokenizer is None:
            return [False] * len(prompts)
        lengths = [len(ids) for ids in tokenizer(prompts, truncation=False).input_ids]
        return [length > tokenizer.model_max_length for length in lengths]

    @torch.inference_mode()
    def generate(
        self, prompts: list[str], negative_prompts: list[str | None], seeds: list[int], key: BatchKey
    ) -> torch.Tensor:
        """Images as an (N, H, W, 3) uint8 tensor on the model's device, one per prompt.

        Each row gets its own CPU generator, so its starting noise depends on its seed alone, on any
        device and in any batch (the computation after that is shaped by the batch: see "Determinism"
        in docs/ARCHITECTURE.md). An absent negative prompt is the empty string, which is what Stable
        Diffusion encodes for the unconditional branch anyway, so rows with and without one can share
        a batch. Pixels become uint8 on the device, so the copy back moves a quarter of the bytes; the
        worker makes that copy, after any step that wants the images on the device.
        """
        negatives = [negative or "" for negative in negative_prompts]
        if self.embeddings is None:
            texts = {"prompt": prompts, "negative_prompt": negatives}
        else:
            texts = {"prompt_embeds": self.embeddings(prompts)}
            if key.guidance_scale > 1:  # the pipeline uses negatives only with classifier-free guidance
                texts["negative_prompt_embeds"] = self.embeddings(negatives)
        images = self.pipe(
            **texts,
            num_inference_steps=key.num_inference_steps,
            guidance_scale=key.guidance_scale,
            width=key.width,
            height=key.height,
            generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],
            output_type="pt",
        ).images
        pixels = (images * 255).round().clamp(0, 255).to(torch.uint8)
        return pixels.permute(0, 2, 3, 1)
