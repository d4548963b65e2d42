"""The job's `speed:` options, applied to a loaded diffusers pipeline in one place.

- `attention`: `sdpa` keeps diffusers' default processors (PyTorch's scaled_dot_product_attention);
  `eager` puts back the classic processors (softmax(QKᵀ)V in plain ops) on the denoiser and the VAE.
- `channels_last`: the denoiser and the VAE in channels-last memory format (faster convolutions on
  tensor cores and on oneDNN).
- `compile`: `torch.compile` of the denoiser (`compile_backend`, inductor by default; `compile_mode`
  reduce-overhead: its step as a CUDA graph, which the static shapes below make possible), with static
  shapes: every batch is padded to `workers.batch_size` with filler rows (copies of the last row,
  whose images are dropped), and one warm-up batch at the job's default size runs at load time, so a
  shard's last, short batch does not compile again. Another width, height, or guidance on/off
  compiles once more.
- `tiny_vae`: an `AutoencoderTiny` (TAESD family) replaces the VAE for decoding.
- `cache`: step caching through diffusers' hooks (caching.py), registered before the compile.
- `compile_cache`: where the warm-up's compiled code is loaded from, or saved to (compile_cache.py).

Each may change the output bytes slightly, so each is in the job's fingerprint when set.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from imagemill.core.errors import ImagemillError
from imagemill.core.spec import CacheSpec, JobSpec
from imagemill.workers.generators.contract import BatchKey
from imagemill.workers.generators.diffusion.caching import enable_step_cache
from imagemill.workers.generators.diffusion.compile_cache import CompileCache, load_compiled, save_compiled
from imagemill.workers.loading import Pretrained


@dataclass(frozen=True)
class SpeedOptions:
    attention: str = "sdpa"
    channels_last: bool = False
    compile_batch: int | None = None  # batch size the denoiser is compiled for; None: not compiled
    compile_backend: str = "inductor"
    compile_mode: str = "default"
    warm_up: BatchKey | None = None  # the batch shape compiled at load time
    tiny_vae: str | None = None  # hub id, local directory or URL; loaded under the model's rules
    cache: CacheSpec | None = None  # step caching; None: every step computed in full
    compile_cache: CompileCache | None = None  # where compiled code is kept; None: compiled by each actor

    @classmethod
    def from_spec(cls, spec: JobSpec) -> SpeedOptions:
        speed, generation = spec.speed, spec.generation
        warm_up = BatchKey(generation.width, generation.height, 1, generation.guidance_scale)
        return cls(
            attention=speed.attention,
            channels_last=speed.channels_last,
            compile_batch=spec.workers.batch_size if speed.compile else None,
            compile_backend=speed.compile_backend,
            compile_mode=speed.compile_mode,
            warm_up=warm_up if speed.compile else None,
            tiny_vae=speed.tiny_vae,
            cache=speed.cache,
            compile_cache=_compile_cache(spec),
        )


def _compile_cache(spec: JobSpec) -> CompileCache | None:
    """`speed.compile_cache` with what the job compiles: the fingerprint's model and speed parts and
    the batch size (the static batch shape)."""
    if not spec.speed.compile_cache:
        return None
    fingerprint = spec.fingerprint()
    compiled = {
        "model": fingerprint["model"],
        "speed": fingerprint["speed"],
        "batch_size": spec.workers.batch_size,
    }
    return CompileCache(
        spec.speed.compile_cache,
        spec.speed.compile_cache_storage_options,
        json.dumps(compiled, sort_keys=True),
    )


def _denoiser(pipe: Any) -> torch.nn.Module:
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if denoiser is None:
        raise ImagemillError(f"speed options need a UNet or transformer; {type(pipe).__name__} has neither")
    return denoiser


def _use_tiny_vae(pipe: Any, source: Pretrained) -> None:
    from diffusers import AutoencoderTiny

    vae = pipe.vae
    tiny = source.weights(AutoencoderTiny, dtype=vae.dtype).to(vae.device)
    upscale = tiny.config.upsampling_scaling_factor ** (len(tiny.config.decoder_block_out_channels) - 1)
    if tiny.config.latent_channels != vae.config.latent_channels or upscale != pipe.vae_scale_factor:
        raise ImagemillError(
            f"speed.tiny_vae {source.source} does not fit the model: it decodes "
            f"{tiny.config.latent_channels} latent channels at {upscale}x, the model's VAE "
            f"{vae.config.latent_channels} at {pipe.vae_scale_factor}x; use the TAESD of the model's family"
        )
    pipe.vae = tiny


def apply_speed_options(pipe: Any, options: SpeedOptions, model: Pretrained) -> None:
    """Apply `options` to a pipeline already on its device (`model`: where it came from, whose storage
    options and safetensors rule the tiny VAE shares); order matters: the VAE is replaced before its
    memory format is set, and the denoiser is compiled last."""
    if options.tiny_vae:
        _use_tiny_vae(pipe, model.beside(options.tiny_vae, "speed.tiny_vae"))
    enable_step_cache(pipe, options.cache)
    if options.attention == "sdpa" and not options.channels_last and not options.compile_batch:
        return  # the defaults: any pipeline class loads, with or without a UNet or transformer
    models = [_denoiser(pipe), *([pipe.vae] if getattr(pipe, "vae", None) is not None else [])]
    if options.attention == "eager":
        for model in models:
            if hasattr(model, "set_default_attn_processor"):
                try:
                    model.set_default_attn_processor()
                except ValueError:
                    raise ImagemillError(
                        f"speed.attention: eager is not available for {type(model).__name__}; use sdpa"
                    ) from None
    if options.channels_last:
        for model in models:
            model.to(memory_format=torch.channels_last)
    if options.compile_batch:
        models[0].compile(backend=options.compile_backend, mode=options.compile_mode, dynamic=False)


def pad(values: list[Any], size: int) -> list[Any]:
    """`values` filled up to `size` with copies of the last one (filler rows, whose images are dropped)."""
    return values + values[-1:] * (size - len(values))


def warm_up(generator: Any, options: SpeedOptions) -> None:
    """Compile the denoiser for the job's default batch shape now, at load time, not in the first shard;
    from the compile cache's saved code when it has this key, which is saved there when it had not."""
    if options.warm_up is None:
        return
    cache, device = options.compile_cache, generator.device
    loaded = cache is not None and load_compiled(cache, options.warm_up, device)
    generator.generate(["warm-up"], [None], [0], options.warm_up)
    if cache is not None and not loaded:
        save_compiled(cache, options.warm_up, device)
