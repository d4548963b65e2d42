"""LoRA adapters named in the spec, loaded into the pipeline once per actor and left active.

Each LoRA is loaded as its own peft adapter (diffusers' `load_lora_weights`, which needs peft) and all
are switched on together with their scales through `set_adapters`. They are not fused into the base
weights: fused, the images would differ in the last bits from those of a pipeline that loads the same
LoRA the usual way, and a LoRA's few extra matrix products cost little next to the model's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from imagemill.core.errors import ImagemillError
from imagemill.core.spec import LoraSpec
from imagemill.workers.loading import Pretrained


def load_loras(pipe: Any, loras: Sequence[LoraSpec], model: Pretrained) -> None:
    """Load each LoRA into `pipe` (fetched and under the safetensors rule as `model`), activate them all."""
    if not loras:
        return
    names = [f"lora_{index}" for index in range(len(loras))]
    for index, (name, lora) in enumerate(zip(names, loras, strict=True)):
        try:
            model.beside(lora.source, f"model.lora[{index}].source").lora_into(
                pipe, weight_name=lora.weight_name, adapter_name=name
            )
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            reason = " ".join(str(exc).split())[:300]  # peft lists every mismatched layer: keep it one line
            raise ImagemillError(f"LoRA {lora.source} does not load into this model: {reason}") from None
        # A LoRA whose layer names match nothing in the model loads nothing, with only a warning.
        if not any(name in adapters for adapters in pipe.get_list_adapters().values()):
            raise ImagemillError(
                f"LoRA {lora.source} matches no layer of this model: is it for another family?"
            )
    pipe.set_adapters(names, adapter_weights=[lora.scale for lora in loras])
