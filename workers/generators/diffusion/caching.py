"""`speed.cache`: step caching through diffusers' cache hooks, which reuse (or predict) what the
denoiser computed at earlier steps instead of recomputing it.

- `first_block`: the first block runs every step; while its output changes by less than `threshold`
  (relative mean) the other blocks' residual from the last full step is reused. The decision is
  taken for the whole batch, and batches are fixed for a spec (see "Determinism"), so it repeats.
- `pyramid`: attention outputs recomputed every `skip_range` steps inside diffusers' default
  timestep window, broadcast between.
- `faster_cache`: the same for attention, with FasterCache's frequency-weighted reuse; FLUX is
  guidance-distilled, so there is no unconditional batch to skip.
- `taylorseer`: after `warm_up_steps` full steps, a full step every `interval` steps and first-order
  Taylor predictions of the attention outputs between.

The hooks need a denoiser built on diffusers' `CacheMixin` and a pipeline that reports its current
timestep and marks its cache context; of the families here only FLUX's text-to-image pipeline does.
Anything else is refused at load, in one line, rather than run without the cache asked for.
"""

from __future__ import annotations

from typing import Any

import torch

from imagemill.core.errors import ImagemillError
from imagemill.core.spec import CacheSpec


def _config(cache: CacheSpec, pipe: Any) -> Any:
    """The diffusers hook config of `cache`; timestep-driven kinds read the pipeline's current step."""
    from diffusers.hooks import (
        FasterCacheConfig,
        FirstBlockCacheConfig,
        PyramidAttentionBroadcastConfig,
        TaylorSeerCacheConfig,
    )

    def current_timestep() -> Any:
        return pipe.current_timestep

    if cache.kind == "first_block":
        return FirstBlockCacheConfig(threshold=cache.threshold)
    if cache.kind == "pyramid":
        return PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=cache.skip_range, current_timestep_callback=current_timestep
        )
    if cache.kind == "faster_cache":
        return FasterCacheConfig(
            spatial_attention_block_skip_range=cache.skip_range,
            current_timestep_callback=current_timestep,
            is_guidance_distilled=True,
            tensor_format="BCHW",
        )
    # float32 Taylor factors: diffusers' bfloat16 default would round the predictions on every device
    return TaylorSeerCacheConfig(
        cache_interval=cache.interval,
        disable_cache_before_step=cache.warm_up_steps,
        taylor_factors_dtype=torch.float32,
    )


def check_cache_support(pipe: Any, cache: CacheSpec | None) -> None:
    """Refuse `cache` for a pipeline whose denoiser or loop cannot run diffusers' cache hooks."""
    if cache is None:
        return
    from diffusers.models.cache_utils import CacheMixin

    denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    if not isinstance(denoiser, CacheMixin) or not hasattr(type(pipe), "current_timestep"):
        raise ImagemillError(
            f"speed.cache ({cache.kind}) is not supported for {type(pipe).__name__} "
            f"({type(denoiser).__name__}); step caching needs a FLUX text-to-image model: remove speed.cache"
        )


def enable_step_cache(pipe: Any, cache: CacheSpec | None) -> None:
    """Register `cache`'s hooks on the pipeline's denoiser (before any compile, which traces them)."""
    if cache is None:
        return
    check_cache_support(pipe, cache)
    try:
        pipe.transformer.enable_cache(_config(cache, pipe))
    except ValueError as exc:  # no blocks or attention layers of the kinds the hooks look for
        raise ImagemillError(
            f"speed.cache ({cache.kind}) does not apply to {type(pipe.transformer).__name__}: {exc}"
        ) from None


def fresh_cache_state(pipe: Any) -> None:
    """Forget what the hooks kept from the last call, so a batch never depends on the one before it
    (diffusers resets only at the end of a call that finishes)."""
    from diffusers.hooks import HookRegistry

    HookRegistry.check_if_exists_or_initialize(pipe.transformer).reset_stateful_hooks()
