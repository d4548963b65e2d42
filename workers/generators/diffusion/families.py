"""Each diffusers text-to-image family's conventions: how its texts are encoded, and what it refuses.

The generator encodes each distinct text once and hands the pipeline embeddings instead of texts. What
"embeddings" means differs per family: SD has one tensor; SDXL and SD3 add a pooled embedding; FLUX has
T5 states plus a CLIP pooled embedding; PixArt and Sana (T5, Gemma-2) add an attention mask. Each
family's ``encode`` calls the pipeline's own ``encode_prompt`` for a list of texts and names its outputs
as ``__call__`` takes them; the negative branch takes the same names prefixed with ``negative_``. A
pipeline that is none of these gets the texts themselves (``encode`` is None).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from imagemill.workers.text_cache import Embeddings


def call_default(pipe: Any, name: str) -> Any:
    """The default of `name` in the pipeline's __call__ (its max_sequence_length...); None if absent."""
    parameter = inspect.signature(pipe.__call__).parameters.get(name)
    return None if parameter is None else parameter.default


def _accepted(method: Callable, **kwargs: Any) -> Any:
    """Call `method` with those of `kwargs` it takes: SDXL's encode_prompt has no prompt_3, SD3's does."""
    names = inspect.signature(method).parameters
    return method(**{name: value for name, value in kwargs.items() if name in names})


def _encode_sd(pipe: Any, texts: list[str], device: str, negative: bool) -> Embeddings:
    embeds, _ = pipe.encode_prompt(texts, device, 1, False)
    return {"prompt_embeds": embeds}


def _encode_same_text(pipe: Any, texts: list[str], device: str) -> Any:
    """`encode_prompt` of the families with several encoders and a pooled output (SDXL, SD3, FLUX):
    every encoder gets the same text (prompt_2/prompt_3 None), one image per text, no guidance pairs."""
    return _accepted(
        pipe.encode_prompt,
        prompt=texts,
        prompt_2=None,
        prompt_3=None,
        device=device,
        num_images_per_prompt=1,
        do_classifier_free_guidance=False,
        max_sequence_length=call_default(pipe, "max_sequence_length"),
    )


def _encode_pooled(pipe: Any, texts: list[str], device: str, negative: bool) -> Embeddings:
    """SDXL and SD3: the last CLIP's (SD3: both) pooled output beside the states."""
    embeds, _, pooled, _ = _encode_same_text(pipe, texts, device)
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


def _encode_flux(pipe: Any, texts: list[str], device: str, negative: bool) -> Embeddings:
    """FLUX: T5 states and CLIP's pooled output (it returns no negatives: no true CFG)."""
    embeds, pooled, _ = _encode_same_text(pipe, texts, device)
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


def _encode_masked(pipe: Any, texts: list[str], device: str, negative: bool) -> Embeddings:
    """PixArt (T5) and Sana (Gemma-2): states padded to max_sequence_length, with their mask.

    Captions are encoded as written (clean_caption=False: PixArt's cleaning needs optional packages, and
    whether they are installed must not change the images). Sana's prompts get the pipeline's default
    complex_human_instruction prefix, as its checkpoints expect; negatives never do, as in Sana itself.
    """
    embeds, mask, _, _ = _accepted(
        pipe.encode_prompt,
        prompt=texts,
        do_classifier_free_guidance=False,
        device=device,
        clean_caption=False,
        max_sequence_length=call_default(pipe, "max_sequence_length"),
        complex_human_instruction=None if negative else call_default(pipe, "complex_human_instruction"),
    )
    return {"prompt_embeds": embeds, "prompt_attention_mask": mask}


@dataclass(frozen=True)
class Family:
    """How imagemill drives one family of pipelines."""

    encode: Callable[[Any, list[str], str, bool], Embeddings] | None
    # False for guidance-distilled models (FLUX): guidance_scale is an input of the model, there is no
    # unconditional branch, and so no use for negative prompts.
    uses_negatives: bool = True
    # The tokenizer that reads the most of a prompt, and whether its limit is the pipeline's
    # max_sequence_length (T5, Gemma) rather than its own model_max_length (CLIP): decides truncation.
    tokenizer: str = "tokenizer"
    long_context: bool = False
    # Sizes must be multiples of this; None where the pipeline checks sizes itself (a ValueError).
    size_multiple: Callable[[Any], int] | None = None


GENERIC = Family(encode=None)
FAMILIES: dict[str, Family] = {
    "StableDiffusionPipeline": Family(_encode_sd),
    "StableDiffusionXLPipeline": Family(_encode_pooled),
    "StableDiffusion3Pipeline": Family(_encode_pooled, tokenizer="tokenizer_3", long_context=True),
    # FLUX rounds a size down to a multiple of 16 (2x2 latent patches) with only a warning: refuse instead.
    "FluxPipeline": Family(
        _encode_flux,
        uses_negatives=False,
        tokenizer="tokenizer_2",
        long_context=True,
        size_multiple=lambda pipe: pipe.vae_scale_factor * 2,
    ),
    "PixArtAlphaPipeline": Family(_encode_masked, long_context=True),
    "PixArtSigmaPipeline": Family(_encode_masked, long_context=True),
    "SanaPipeline": Family(_encode_masked, long_context=True),
}


def family_of(pipe: Any) -> Family:
    return FAMILIES.get(type(pipe).__name__, GENERIC)
