"""A diffusers text-to-image pipeline, loaded once per actor and pinned to its device."""

from __future__ import annotations

from collections import OrderedDict

import torch

from imagemill.workers.rows import BatchKey
from imagemill.workers.speed import SpeedOptions, apply_speed_options, pad, warm_up
from imagemill.workers.stage_timer import StageTimer, time_pipeline_stages

EMBEDDING_CACHE_SIZE = 512  # distinct texts whose embeddings an actor keeps (prompts and negatives)


class DiffusersGenerator:
    def __init__(
        self,
        source: str,
        dtype: str,
        device: str,
        safetensors_only: bool = True,
        speed: SpeedOptions | None = None,
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
        self.pipe.set_progress_bar_config(disable=True)
        self.device = device
        self.speed = speed = speed or SpeedOptions()
        apply_speed_options(self.pipe, speed)
        self.stage_timer = StageTimer(device)  # text encode and decode time, taken by the worker per batch
        time_pipeline_stages(self.pipe, self.stage_timer)
        # Stable Diffusion encodes a negative prompt exactly as it encodes a prompt, so one cache of
        # text → embedding serves both, and the empty negative prompt is encoded once per actor.
        # Other pipelines get the texts and encode them themselves.
        self.embeddings: OrderedDict[str, torch.Tensor] | None = (
            OrderedDict() if isinstance(self.pipe, diffusers.StableDiffusionPipeline) else None
        )
        warm_up(self, speed)
        self.stage_timer.take()

    def _embed(self, texts: list[str]) -> torch.Tensor:
        """Embeddings of `texts`; each distinct text is encoded once while it stays in the cache."""
        cache = self.embeddings
        missing = [text for text in dict.fromkeys(texts) if text not in cache]
        if missing:
            encoded, _ = self.pipe.encode_prompt(missing, self.device, 1, False)
            cache.update(zip(missing, encoded, strict=True))
        batch = torch.stack([cache[text] for text in texts])
        for text in texts:
            cache.move_to_end(text)
        while len(cache) > EMBEDDING_CACHE_SIZE:
            cache.popitem(last=False)
        return batch

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
        count = len(prompts)
        if self.speed.compile_batch:  # static shapes for the compiled denoiser
            prompts, negative_prompts, seeds = (
                pad(values, self.speed.compile_batch) for values in (prompts, negative_prompts, seeds)
            )
        negatives = [negative or "" for negative in negative_prompts]
        if self.embeddings is None:
            texts = {"prompt": prompts, "negative_prompt": negatives}
        else:
            texts = {"prompt_embeds": self._embed(prompts)}
            if key.guidance_scale > 1:  # the pipeline uses negatives only with classifier-free guidance
                texts["negative_prompt_embeds"] = self._embed(negatives)
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
        return pixels.permute(0, 2, 3, 1)[:count]
