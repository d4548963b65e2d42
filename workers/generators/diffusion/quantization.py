"""Weight quantisation of the denoiser (`model.quantization`) through torchao's `quantize_`.

Only the denoiser (the UNet, or the transformer of DiT pipelines) is quantised: it runs once per step
and holds most of the weights, while the text encoder runs once per distinct prompt and the VAE once
per image. `quantize_` replaces the weights of its `nn.Linear` layers (attention projections and
feed-forward layers; convolutions stay as they are) in place:

- int8_weight_only: int8 weights, per output channel; activations stay in the model's dtype.
- int8_dynamic: int8 weights, and activations quantised to int8 per token at run time.
- fp8: float8 (e4m3) weights and activations, scaled per tensor; needs a CUDA GPU of compute
  capability 8.9 or newer (Ada, Hopper), whose tensor cores multiply fp8.

torchao is an optional dependency (`pip install 'imagemill[quantization]'`): each torchao release
supports a narrow range of torch versions, and a job that does not quantise should not need it.
"""

from __future__ import annotations

from typing import Any

import torch

from imagemill.core.errors import ImagemillError

FP8_CAPABILITY = (8, 9)


def _config(method: str) -> Any:
    try:
        import torchao.quantization as ao
    except ImportError as exc:
        raise ImagemillError(
            f"model.quantization: {method} needs torchao, which is not installed on this node ({exc}); "
            "install it with pip install 'imagemill[quantization]', or set model.quantization: none"
        ) from None
    configs = {
        "int8_weight_only": ao.Int8WeightOnlyConfig,
        "int8_dynamic": ao.Int8DynamicActivationInt8WeightConfig,
        "fp8": ao.Float8DynamicActivationFloat8WeightConfig,
    }
    return ao.quantize_, configs[method]()


def _check_fp8(device: str) -> None:
    if not device.startswith("cuda") or not torch.cuda.is_available():
        raise ImagemillError(
            f"model.quantization: fp8 needs a CUDA GPU, and this worker runs on {device}; "
            "use int8_weight_only or int8_dynamic there"
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_CAPABILITY:
        raise ImagemillError(
            f"model.quantization: fp8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper); "
            f"{torch.cuda.get_device_name(device)} is {capability[0]}.{capability[1]}: "
            "use int8_weight_only or int8_dynamic"
        )


def denoiser(pipe: Any) -> torch.nn.Module:
    """The pipeline's denoiser: `unet` (Stable Diffusion and its kin) or `transformer` (DiT, Flux, SD3)."""
    for name in ("unet", "transformer"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise ImagemillError(
        f"model.quantization: {type(pipe).__name__} has no unet or transformer to quantise; "
        "set model.quantization: none for this model"
    )


def quantize_denoiser(pipe: Any, method: str, device: str) -> None:
    """Quantise the pipeline's denoiser in place, on `device` (where it already is); `none` does nothing."""
    if method == "none":
        return
    if method == "fp8":
        _check_fp8(device)
    quantize, config = _config(method)
    quantize(denoiser(pipe), config)
