"""The `speed:` options change how the model runs, not what it makes: right images, options really used."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny
from diffusers.models.attention_processor import AttnProcessor
from torch._dynamo.utils import counters

import imagemill
from imagemill.core.errors import ImagemillError
from imagemill.testing.tiny_model import make_tiny_autoencoder
from imagemill.workers.generators.diffusion.generator import DiffusersGenerator
from imagemill.workers.generators.diffusion.speed import SpeedOptions
from imagemill.workers.rows import BatchKey

KEY = BatchKey(width=32, height=32, num_inference_steps=2, guidance_scale=5.0)
PROMPTS, NEGATIVES, SEEDS = (
    ["a red circle", "a cat on a boat", "a blue star"],
    [None, "blurry", None],
    [1, 2, 3],
)


def _images(generator: DiffusersGenerator, rows: int = 3) -> np.ndarray:
    return generator.generate(PROMPTS[:rows], NEGATIVES[:rows], SEEDS[:rows], KEY).numpy()


def _close(ours: np.ndarray, reference: np.ndarray) -> None:
    """Same shape and, pixel for pixel, within a few levels: another kernel, the same image."""
    assert ours.shape == reference.shape and ours.dtype == np.uint8
    assert np.abs(ours.astype(int) - reference.astype(int)).max() <= 3


@pytest.fixture(scope="module")
def reference(tiny_model) -> np.ndarray:
    return _images(DiffusersGenerator(tiny_model, "float32", "cpu"))


def test_eager_attention_puts_back_the_classic_processors(tiny_model, reference):
    generator = DiffusersGenerator(tiny_model, "float32", "cpu", speed=SpeedOptions(attention="eager"))
    processors = {*generator.pipe.unet.attn_processors.values(), *generator.pipe.vae.attn_processors.values()}
    assert {type(processor) for processor in processors} == {AttnProcessor}
    _close(_images(generator), reference)


def test_channels_last_puts_the_unet_and_vae_weights_in_that_format(tiny_model, reference):
    generator = DiffusersGenerator(tiny_model, "float32", "cpu", speed=SpeedOptions(channels_last=True))
    for model in (generator.pipe.unet, generator.pipe.vae):
        weights = [
            m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size[0] > 1
        ]
        assert weights and not any(weight.is_contiguous() for weight in weights)
        assert all(weight.is_contiguous(memory_format=torch.channels_last) for weight in weights)
    _close(_images(generator), reference)


def test_compiled_denoiser_is_warmed_up_and_short_batches_do_not_recompile(tmp_path, tiny_model, reference):
    spec = imagemill.build_spec(
        {
            "input": {"path": str(tmp_path)},
            "output": {"path": str(tmp_path / "out")},
            "model": {"source": tiny_model},
            "generation": {"width": 32, "height": 32, "guidance_scale": 5.0},
            "workers": {"batch_size": 4},
            # "eager" traces and guards as inductor does, without its minutes of C++ compiling here
            "speed": {"compile": True, "compile_backend": "eager"},
        }
    )
    torch._dynamo.reset()
    counters.clear()
    try:
        generator = DiffusersGenerator(tiny_model, "float32", "cpu", speed=SpeedOptions.from_spec(spec))
        assert counters["stats"]["unique_graphs"] >= 1, "compiled at load time, by the warm-up batch"
        with torch.compiler.set_stance("fail_on_recompile"):  # a batch of another shape would raise
            three, two = _images(generator, 3), _images(generator, 2)
    finally:
        torch._dynamo.reset()
    _close(three, reference)
    _close(two, reference[:2])


def test_tiny_vae_decodes_instead_of_the_models_vae(tmp_path, tiny_model, reference):
    spec = imagemill.build_spec(
        {
            "input": {"path": str(tmp_path)},
            "output": {"path": str(tmp_path / "out")},
            "model": {"source": tiny_model},
            "speed": {"tiny_vae": str(make_tiny_autoencoder(tmp_path / "taesd"))},
        }
    )
    generator = DiffusersGenerator(tiny_model, "float32", "cpu", speed=SpeedOptions.from_spec(spec))
    assert isinstance(generator.pipe.vae, AutoencoderTiny)
    images = _images(generator)
    assert images.shape == reference.shape
    assert np.abs(images.astype(int) - reference.astype(int)).mean() > 10, "another decoder, other pixels"
    assert generator.stage_timer.take()["decode"] > 0, "the decode stage times the tiny VAE"


def test_tiny_vae_of_another_family_is_refused_in_one_line(tmp_path, tiny_model):
    options = SpeedOptions(tiny_vae=str(make_tiny_autoencoder(tmp_path / "taesd3", latent_channels=16)))
    with pytest.raises(ImagemillError, match="speed.tiny_vae .* does not fit the model"):
        DiffusersGenerator(tiny_model, "float32", "cpu", speed=options)


def test_speed_options_that_change_pixels_are_fingerprinted_and_the_compile_cache_is_not(tmp_path):
    """A resume with another attention or memory format would mix two kinds of pixels in one output;
    where compiled artifacts are cached changes no byte."""
    base = {
        "input": {"path": str(tmp_path)},
        "output": {"path": str(tmp_path / "out")},
        "model": {"source": "x/y"},
    }
    plain = imagemill.build_spec(base).fingerprint()
    fast = imagemill.build_spec(
        {**base, "speed": {"attention": "eager", "channels_last": True}}
    ).fingerprint()
    assert fast["speed"]["attention"] == "eager" and fast["speed"]["channels_last"] is True
    assert fast != plain
    compiled = {"compile": True}
    uncached = imagemill.build_spec({**base, "speed": compiled}).fingerprint()
    cached = imagemill.build_spec(
        {**base, "speed": {**compiled, "compile_cache": str(tmp_path)}}
    ).fingerprint()
    assert "compile_cache" not in cached["speed"] and cached == uncached


def _compile_mode_spec(tmp_path, tiny_model, **speed):
    return imagemill.build_spec(
        {
            "input": {"path": str(tmp_path)},
            "output": {"path": str(tmp_path / "out")},
            "model": {"source": tiny_model},
            "generation": {"width": 32, "height": 32, "guidance_scale": 5.0},
            "workers": {"batch_size": 4},
            "speed": speed,
        }
    )


def test_compile_mode_reaches_torch_compile_is_fingerprinted_and_needs_inductor(
    tmp_path, tiny_model, monkeypatch
):
    """`speed.compile_mode: reduce-overhead` (CUDA graphs of the denoiser's step, issue #27) is handed to
    torch.compile with the static batch; it changes kernels, so it is in the fingerprint; a mode
    without compile, or with another backend (which would get `mode` as an unknown argument), is one
    line naming the setting."""
    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda module, **kwargs: calls.append(kwargs))
    spec = _compile_mode_spec(tmp_path, tiny_model, compile=True, compile_mode="reduce-overhead")
    DiffusersGenerator(tiny_model, "float32", "cpu", speed=SpeedOptions.from_spec(spec))
    assert calls == [{"backend": "inductor", "mode": "reduce-overhead", "dynamic": False}]
    plain = _compile_mode_spec(tmp_path, tiny_model, compile=True).fingerprint()
    assert spec.fingerprint()["speed"]["compile_mode"] == "reduce-overhead" and spec.fingerprint() != plain
    for speed in (
        {"compile_mode": "reduce-overhead"},
        {"compile": True, "compile_backend": "eager", "compile_mode": "max-autotune"},
    ):
        with pytest.raises(ImagemillError, match="compile_mode .* needs compile: true and compile_backend"):
            _compile_mode_spec(tmp_path, tiny_model, **speed)
