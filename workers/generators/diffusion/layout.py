"""Where a diffusers pipeline's weights live and run: `model.parallel` and `model.offload`, in one place.

- `parallel: components`: diffusers' pipeline-level `device_map="balanced"` puts each component (text
  encoders, denoiser, VAE) whole on one of the GPUs the actor sees, largest first; accelerate's hooks
  move a component's inputs onto its GPU and its outputs back. On a CPU worker there is no GPU to
  spread over and every component stays in host memory.
- `parallel: context`: when `torch.distributed` is initialised with more than one process (a gang of
  actors, one per GPU, each running the same batch), the denoiser runs diffusers' context parallelism
  over the default group: Ulysses attention, each process holding the whole model and a slice of the
  tokens, with all-to-alls around attention. Its attention heads and image tokens must divide by the
  number of processes (diffusers' `ulysses_anything` lifts that with uneven all-gathers, which gloo
  refuses: "ProcessGroupGloo::allgather: invalid tensor size"). Not ring attention: it needs the
  attention's log-sum-exp, which diffusers' `native` backend (the one that runs on CPU and gloo)
  refuses (attention_dispatch.py `_native_attention_forward_op`: "Native attention does not support
  return_lse=True"). One process: the whole denoiser here, as with `none`.
- `offload`: for one GPU too small for the model, weights wait in host memory. `model`: a component
  moves onto the GPU while it runs (`enable_model_cpu_offload`); `group`: each leaf layer is copied on
  a side CUDA stream ahead of its use (`enable_group_offload`, leaf level, with streams); `sequential`:
  each layer moves on as it runs (`enable_sequential_cpu_offload`). On a CPU worker the weights already
  are where they run, so offloading has nothing to do and is not applied (accelerate's sequential
  offload onto the CPU fails: it offloads to the meta device and rebuilds parameters with an argument
  torch's CPU tensors refuse); workers/device_warnings.py says so.

None of these change the arithmetic of a layer, so images are those of `none` within the determinism
rule of docs/ARCHITECTURE.md (context: a level in a few pixels, as between batch sizes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from imagemill.core.errors import ImagemillError


def context_processes() -> int:
    """How many processes share the denoiser's tokens under `parallel: context`: torch.distributed's
    world size, 1 where it is not initialised."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def load_options(parallel: str) -> dict[str, Any]:
    """Arguments of the pipeline's `from_pretrained`: components are placed as they load."""
    return {"device_map": "balanced"} if parallel == "components" else {}


def place(pipe: Any, parallel: str, offload: str, device: str) -> None:
    """Put a loaded pipeline where it runs, before quantisation and speed options (which act on the
    modules where they run); an offloaded pipeline stays in host memory until `offload`."""
    if parallel == "components" or (offload != "none" and not device.startswith("cpu")):
        return
    pipe.to(device)
    if parallel == "context":
        _spread_context(pipe, device)


def apply_offload(pipe: Any, offload: str, device: str) -> None:
    """Offload hooks, attached last so that they cover every module the pipeline ends up with (a
    `speed.tiny_vae` replaces the VAE)."""
    if offload == "none" or device.startswith("cpu"):
        return
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "group":
        pipe.enable_group_offload(
            onload_device=torch.device(device), offload_type="leaf_level", use_stream=True
        )
    else:
        pipe.enable_sequential_cpu_offload(device=device)


def _spread_context(pipe: Any, device: str) -> None:
    """Ulysses context parallelism of the denoiser over torch.distributed's default group."""
    world = context_processes()
    if world == 1:
        return
    import diffusers

    transformer = getattr(pipe, "transformer", None)
    if getattr(transformer, "_cp_plan", None) is None:
        denoiser = type(transformer or getattr(pipe, "unet", None)).__name__
        raise ImagemillError(
            f"model.parallel: context needs a transformer that diffusers {diffusers.__version__} can run "
            f"context-parallel (FLUX, Wan, QwenImage, LTX...); {type(pipe).__name__}'s {denoiser} cannot: "
            "set model.parallel: components"
        )
    heads = transformer.config.num_attention_heads
    if heads % world:
        raise ImagemillError(
            f"model.parallel: context splits {type(transformer).__name__}'s {heads} attention heads over "
            f"{world} processes: give the replica a number of GPUs that divides {heads}"
        )
    config = diffusers.ContextParallelConfig(ulysses_degree=world)
    with _cpu_counts_as_a_device(device):
        transformer.enable_parallelism(config=config)


@contextlib.contextmanager
def _cpu_counts_as_a_device(device: str) -> Iterator[None]:
    """diffusers 0.42 puts rank r on device `r % torch.accelerator.device_count()` (modeling_utils.py
    `_resolve_parallel_config`), a division by zero where there is no accelerator; on a CPU worker the
    CPU counts as the one device for that call."""
    if not device.startswith("cpu") or torch.accelerator.device_count() > 0:
        yield
        return
    count = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = count
