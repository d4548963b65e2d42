"""LoRA adapters named in the spec, loaded into the pipeline once per actor and left active.

Each LoRA is loaded as its own peft adapter (diffusers' `load_lora_weights`, which needs peft) and all
are switched on together with their scales through `set_adapters`. They are not fused into the base
weights: fused, the images would differ in the last bits from those of a pipeline that loads the same
LoRA the usual way, and a LoRA's few extra matrix products cost little next to the model's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from imagemill.errors import ImagemillError
from imagemill.spec import LoraSpec


def load_loras(pipe: Any, loras: Sequence[tuple[LoraSpec, str]], safetensors_only: bool) -> None:
    """Load each (LoRA, where its weights are on this node) into `pipe`, and activate them all."""
    if not loras:
        return
    names = [f"lora_{index}" for index in range(len(loras))]
    for name, (lora, source) in zip(names, loras, strict=True):
        try:
            pipe.load_lora_weights(
                source,
                weight_name=lora.weight_name,
                adapter_name=name,
                use_safetensors=True if safetensors_only else None,
            )
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            reason = " ".join(str(exc).split())[:300]  # peft lists every mismatched layer: keep it one line
            raise ImagemillError(f"LoRA {lora.source} does not load into this model: {reason}") from None
        # A LoRA whose layer names match nothing in the model loads nothing, with only a warning.
        if not any(name in adapters for adapters in pipe.get_list_adapters().values()):
            raise ImagemillError(
                f"LoRA {lora.source} matches no layer of this model: is it for another family?"
            )
    pipe.set_adapters(names, adapter_weights=[lora.scale for lora, _ in loras])
