"""model.quantization on the CPU: the denoiser's linear weights really become int8, and its outputs and
the images stay close to the unquantised model's within stated tolerances; fp8 is refused off a GPU.

Tolerances (measured on the tiny model: relative error 0.13 % int8_weight_only, 0.34 % int8_dynamic;
images 0.03 and 0.2 levels mean): the denoiser's output within 1 % (relative L2) of the float32 one,
and the images within 1 level mean and 8 levels max of 255.
"""

from __future__ import annotations

import pytest
import torch

import imagemill
from imagemill.core.errors import ImagemillError
from imagemill.workers.generators.diffusion.generator import DiffusersGenerator
from imagemill.workers.rows import BatchKey

KEY = BatchKey(width=32, height=32, num_inference_steps=2, guidance_scale=5.0)
PROMPTS, SEEDS = ["a red cat", "a blue dog on the left", "a green tree"], [1, 2, 3]
DENOISER_RELATIVE_ERROR = 0.01
IMAGE_MEAN_LEVELS, IMAGE_MAX_LEVELS = 1.0, 8


@pytest.fixture(scope="module")
def unquantised(tiny_model) -> DiffusersGenerator:
    return DiffusersGenerator(tiny_model, "float32", "cpu")


def _denoise(generator: DiffusersGenerator) -> torch.Tensor:
    """The UNet's prediction on a fixed input: latents, timestep and text states from seed 0."""
    inputs = torch.Generator("cpu").manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=inputs)
    text = torch.randn(2, 77, 32, generator=inputs)
    with torch.inference_mode():
        return generator.pipe.unet(latents, torch.tensor([500, 500]), encoder_hidden_states=text).sample


@pytest.mark.parametrize("method", ["int8_weight_only", "int8_dynamic"])
def test_int8_quantised_denoiser_stays_close_to_float(tiny_model, unquantised, method):
    from torchao.quantization import Int8Tensor

    quantised = DiffusersGenerator(tiny_model, "float32", "cpu", quantization=method)
    linears = [m for m in quantised.pipe.unet.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m.weight, Int8Tensor) for m in linears), "every linear weight is int8"
    assert all(
        type(m.weight) is torch.nn.Parameter
        for m in quantised.pipe.unet.modules()
        if isinstance(m, torch.nn.Conv2d)
    ), "convolutions are left as they are"
    assert not any(isinstance(p, Int8Tensor) for p in quantised.pipe.vae.parameters()), "only the denoiser"

    reference, output = _denoise(unquantised), _denoise(quantised)
    error = ((output - reference).norm() / reference.norm()).item()
    assert 0 < error < DENOISER_RELATIVE_ERROR, error  # > 0: the int8 path really ran

    images = quantised.generate(PROMPTS, [None] * 3, SEEDS, KEY).float()
    expected = unquantised.generate(PROMPTS, [None] * 3, SEEDS, KEY).float()
    assert (images - expected).abs().mean() < IMAGE_MEAN_LEVELS
    assert (images - expected).abs().max() <= IMAGE_MAX_LEVELS


def test_the_worker_quantises_as_the_spec_says(tmp_path, tiny_model):
    """The spec's setting reaches the actor's generator (the class Ray runs, built here in-process)."""
    from torchao.quantization import Int8Tensor

    from imagemill.workers.worker import ShardWorker

    spec = imagemill.build_spec(
        {
            "input": {"path": str(tmp_path)},
            "output": {"path": str(tmp_path / "out")},
            "model": {"source": tiny_model, "device": "cpu", "quantization": "int8_weight_only"},
        }
    )
    unet = ShardWorker(spec).generator.pipe.unet
    assert isinstance(unet.mid_block.attentions[0].transformer_blocks[0].attn1.to_q.weight, Int8Tensor)


def test_fp8_is_refused_without_a_capable_gpu(tiny_model):
    with pytest.raises(ImagemillError, match=r"fp8 needs a CUDA GPU, and this worker runs on cpu"):
        DiffusersGenerator(tiny_model, "float32", "cpu", quantization="fp8")


def test_quantization_is_in_the_fingerprint_only_when_on(tmp_path):
    def fingerprint(quantization: str | None) -> dict:
        model = {"source": "some/model"} | ({"quantization": quantization} if quantization else {})
        spec = {"input": {"path": str(tmp_path)}, "output": {"path": str(tmp_path / "out")}, "model": model}
        return imagemill.build_spec(spec).fingerprint()

    assert fingerprint(None) == fingerprint("none"), "none is the default"
    assert fingerprint("int8_weight_only")["model"]["quantization"] == "int8_weight_only"
    assert fingerprint("int8_dynamic") != fingerprint("int8_weight_only")
