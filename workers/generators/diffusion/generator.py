"""A diffusers text-to-image pipeline of any family (families.py), with its LoRAs, loaded once per actor."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

from imagemill.core.schedulers import a1111_sampler
from imagemill.core.spec import JobSpec, LoraSpec, SchedulerSpec
from imagemill.workers.console import quiet_model_libraries
from imagemill.workers.generators.contract import BatchKey
from imagemill.workers.generators.diffusion.caching import check_cache_support, fresh_cache_state
from imagemill.workers.generators.diffusion.families import call_default, family_of
from imagemill.workers.generators.diffusion.image_to_image import (
    image_to_image_pipeline,
    mask_images,
    paste_back,
    source_images,
)
from imagemill.workers.generators.diffusion.layout import (
    apply_offload,
    context_processes,
    load_options,
    place,
)
from imagemill.workers.generators.diffusion.lora import load_loras
from imagemill.workers.generators.diffusion.quantization import quantize_denoiser
from imagemill.workers.generators.diffusion.schedulers import describe, swap_scheduler
from imagemill.workers.generators.diffusion.speed import SpeedOptions, apply_speed_options, pad, warm_up
from imagemill.workers.loading import Pretrained
from imagemill.workers.stage_timer import StageTimer, device_events, time_pipeline_stages
from imagemill.workers.text_cache import Embeddings, TextEmbeddingCache


class DiffusersGenerator:
    def __init__(
        self,
        source: Pretrained | str,
        dtype: str,
        device: str,
        speed: SpeedOptions | None = None,
        loras: Sequence[LoraSpec] = (),
        quantization: str = "none",
        scheduler: SchedulerSpec | None = None,
        image_to_image: bool = False,
        parallel: str = "none",
        offload: str = "none",
        inpainting: bool = False,
    ):
        """`source`: the pipeline (a hub id, local directory or URL, or a `Pretrained` with its storage
        options and safetensors rule, which hold for each LoRA and speed.tiny_vae too); `scheduler`:
        the sampler to use instead of the pipeline's own (schedulers.py); `image_to_image`: also build
        the family's image-to-image pipeline, for `generate(sources=...)`; `parallel`, `offload`: where
        the weights live and run (layout.py); `inpainting`: its inpainting
        pipeline instead, for `generate(sources=..., masks=...)`."""
        # diffusers is imported here, not at the top, so that the driver never pays for importing it.
        import diffusers

        quiet_model_libraries()
        model = self.model_source = Pretrained.model(source)  # its files resolved once (provenance)
        self.pipe = model.weights(
            diffusers.DiffusionPipeline, dtype=getattr(torch, dtype), **load_options(parallel)
        )
        load_loras(self.pipe, loras, model)
        overrides = scheduler.config if scheduler else {}
        if scheduler is not None:
            swap_scheduler(self.pipe, scheduler.name, overrides)
        self.scheduler_name = describe(self.pipe, overrides)  # the metadata's `scheduler`
        self.a1111_sampler = a1111_sampler(type(self.pipe.scheduler).__name__, self.pipe.scheduler.config)
        place(self.pipe, parallel, offload, device)
        # processes sharing each batch's tokens (parallel: context): sizes must cut into as many slices
        self.token_slices = context_processes() if parallel == "context" else 1
        quantize_denoiser(self.pipe, quantization, device)
        self.pipe.set_progress_bar_config(disable=True)
        self.device = device
        self.speed = speed = speed or SpeedOptions()
        apply_speed_options(self.pipe, speed, model)
        apply_offload(self.pipe, offload, device)
        # text encode and decode time (device events on CUDA), taken by the worker per batch
        self.stage_timer = StageTimer(device_events(device))
        time_pipeline_stages(self.pipe, self.stage_timer)
        self.family = family_of(self.pipe)
        self.accepted = _accepted_arguments(self.pipe)
        # the pipeline that draws from sources: image-to-image, or inpainting
        self.from_sources = (
            image_to_image_pipeline(self.pipe, inpainting) if image_to_image or inpainting else None
        )
        if self.from_sources is not None:
            check_cache_support(self.from_sources, speed.cache)
        self.from_sources_accepted = (
            _accepted_arguments(self.from_sources) if self.from_sources is not None else None
        )
        # SDXL's unconditional branch for "no negative prompt" is zeros, not the encoded empty string.
        self.zero_absent_negative = bool(getattr(self.pipe.config, "force_zeros_for_empty_prompt", False))
        # (is negative, text) → that text's embeddings. Families encode a negative prompt as a prompt
        # except Sana, which prefixes prompts with an instruction; None is an absent negative. A
        # pipeline of no known family gets the texts and encodes them itself.
        self.embeddings: TextEmbeddingCache | None = (
            TextEmbeddingCache(self._encode) if self.family.encode else None
        )
        warm_up(self, speed)
        self.stage_timer.take()

    @classmethod
    def from_spec(cls, spec: JobSpec, device: str) -> DiffusersGenerator:
        """The job's model with its LoRAs, quantisation and speed options."""
        model = spec.model
        return cls(
            Pretrained.of(model, "model"),
            model.dtype,
            device,
            speed=SpeedOptions.from_spec(spec),
            loras=model.lora,
            quantization=model.quantization,
            scheduler=model.scheduler,
            image_to_image=spec.input.image_column is not None,
            parallel=model.parallel,
            offload=model.offload,
            inpainting=spec.input.mask_column is not None,
        )

    def _encode(self, keys: list[tuple[bool, str | None]]) -> Embeddings:
        """The family's embeddings of distinct (is negative, text) keys, all prompts or all negatives."""
        negative = keys[0][0]
        encoded = self.family.encode(self.pipe, [text or "" for _, text in keys], self.device, negative)
        absent = [text is None and self.zero_absent_negative for _, text in keys]
        if not any(absent):
            return encoded
        zeroed = torch.tensor(absent, device=self.device)
        return {
            name: rows.masked_fill(zeroed.view(-1, *[1] * (rows.dim() - 1)), 0)
            for name, rows in encoded.items()
        }

    def truncated(self, prompts: list[str]) -> list[bool]:
        """Whether each prompt is longer than the text encoder takes; the pipeline then cuts it.

        The encoder that reads the most decides (T5 or Gemma where the family has one).
        """
        tokenizer = getattr(self.pipe, self.family.tokenizer, None)
        limit = call_default(self.pipe, "max_sequence_length") if self.family.long_context else None
        if tokenizer is None:  # SD3 loaded without its T5: the CLIP encoders read the prompt
            tokenizer, limit = getattr(self.pipe, "tokenizer", None), None
        if tokenizer is None:
            return [False] * len(prompts)
        lengths = [len(ids) for ids in tokenizer(prompts, truncation=False).input_ids]
        return [length > (limit or tokenizer.model_max_length) for length in lengths]

    def _check_size(self, key: BatchKey) -> None:
        """Refuse sizes the pipeline would silently change (the worker makes the rows model_rejected)."""
        multiple = self.family.size_multiple(self.pipe) if self.family.size_multiple else 1
        if key.width % multiple or key.height % multiple:
            raise ValueError(
                f"{type(self.pipe).__name__} needs width and height divisible by {multiple}, "
                f"got {key.width}x{key.height}"
            )
        tokens = (key.width // multiple) * (key.height // multiple)
        if multiple > 1 and tokens % self.token_slices:
            raise ValueError(
                f"model.parallel: context cuts {key.width}x{key.height}'s {tokens} image tokens over "
                f"{self.token_slices} processes, which needs a token count that divides by "
                f"{self.token_slices}: use a size whose (width/{multiple})x(height/{multiple}) does"
            )

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[str],
        negative_prompts: list[str | None],
        seeds: list[int],
        key: BatchKey,
        sources: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Images as an (N, H, W, 3) uint8 tensor on the model's device, one per prompt.

        Each row gets its own CPU generator, so its starting noise depends on its seed alone, on any
        device and in any batch (the computation after that is shaped by the batch: see "Determinism"
        in docs/ARCHITECTURE.md). An absent negative prompt is what the family's pipeline uses without
        one (the empty string, or zeros for SDXL), row by row, so rows with and without one can share a
        batch. Text arguments are those of the family (see families.py). Pixels become uint8 on the
        device, so the copy back moves a quarter of the bytes; the worker makes that copy, after any
        step that wants the images on the device.

        `sources` (image-to-image): the rows' source images, (N, H, W, 3) uint8 at the batch's size,
        drawn with the image-to-image pipeline at `key.strength`. `masks` (inpainting): the rows' masks,
        (N, H, W) uint8, 0 where the source is kept: drawn with the inpainting pipeline, then the
        source's pixels pasted back outside the mask (image_to_image.paste_back).
        """
        count = len(prompts)
        if self.speed.compile_batch:  # static shapes for the compiled denoiser
            prompts, negative_prompts, seeds = (
                pad(values, self.speed.compile_batch) for values in (prompts, negative_prompts, seeds)
            )
            if sources is not None:
                sources = _pad_rows(sources, len(prompts))
            if masks is not None:
                masks = _pad_rows(masks, len(prompts))
        self._check_size(key)
        arguments: dict[str, Any] = {
            "num_inference_steps": key.num_inference_steps,
            "guidance_scale": key.guidance_scale,  # FLUX: the distilled guidance the model is given
            "width": key.width,
            "height": key.height,
            "generator": [torch.Generator("cpu").manual_seed(seed) for seed in seeds],
            "output_type": "pt",
            "use_resolution_binning": False,  # PixArt, Sana: generate the size asked for, not a resized one
        }
        if self.embeddings is None:
            arguments.update(
                prompt=prompts, negative_prompt=[negative or "" for negative in negative_prompts]
            )
        else:
            # PixArt and Sana default negative_prompt to "", which they refuse next to negative embeddings.
            arguments.update(self.embeddings([(False, prompt) for prompt in prompts]), negative_prompt=None)
            # Negatives only feed classifier-free guidance, which guidance-distilled models do not run.
            if self.family.uses_negatives and key.guidance_scale > 1:
                negatives = self.embeddings([(True, negative) for negative in negative_prompts])
                arguments.update({f"negative_{name}": rows for name, rows in negatives.items()})
        pipe, accepted = self.pipe, self.accepted
        if sources is not None:
            pipe, accepted = self.from_sources, self.from_sources_accepted
            arguments.update(image=source_images(sources, self.pipe.vae.dtype), strength=key.strength)
        if masks is not None:
            arguments.update(mask_image=mask_images(masks, self.pipe.vae.dtype))
        if accepted is not None:
            arguments = {name: value for name, value in arguments.items() if name in accepted}
        if self.speed.cache is not None:
            fresh_cache_state(self.pipe)
        images = pipe(**arguments).images
        if images.shape[-2:] != (key.height, key.width):
            raise ValueError(
                f"{type(self.pipe).__name__} made {images.shape[-1]}x{images.shape[-2]} images "
                f"for {key.width}x{key.height}"
            )
        pixels = (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        # parallel: components leaves the images on the VAE's GPU, which may not be the actor's device
        pixels = pixels.to(self.device)
        if masks is not None:
            assert sources is not None  # the spec: a mask column needs an image column
            pixels = paste_back(pixels, sources, masks)
        return pixels[:count]


def _pad_rows(rows: torch.Tensor, count: int) -> torch.Tensor:
    """`rows` with its last row repeated up to `count` rows (a compiled denoiser's static batch)."""
    return torch.cat([rows, rows[-1:].expand(count - len(rows), *rows.shape[1:])])


def _accepted_arguments(pipe: Any) -> set[str] | None:
    """The names `pipe.__call__` takes; None when it takes **kwargs, so every argument is passed on."""
    call = inspect.signature(pipe.__call__).parameters.values()
    return None if any(p.kind is p.VAR_KEYWORD for p in call) else {p.name for p in call}
