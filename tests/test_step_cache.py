"""`speed.cache`: diffusers' step caching on FLUX really skips work, repeats byte for byte, and is
refused in one line where the family cannot run it."""

from __future__ import annotations

import numpy as np
import pytest

import imagemill
from imagemill.core.errors import ImagemillError
from imagemill.core.spec import CacheSpec
from imagemill.testing.tiny_families import make_tiny_family
from imagemill.workers.generators.diffusion.generator import DiffusersGenerator
from imagemill.workers.generators.diffusion.speed import SpeedOptions
from imagemill.workers.rows import BatchKey

pytestmark = pytest.mark.model  # its tests build or load a model (the tiers: tests/conftest.py)

# 8 steps: enough for every kind to reach steps it reuses (diffusers' timestep windows, warm-up)
KEY = BatchKey(width=32, height=32, num_inference_steps=8, guidance_scale=3.5)
CACHES = {
    "first_block": CacheSpec(kind="first_block", threshold=0.5),
    "pyramid": CacheSpec(kind="pyramid"),
    "faster_cache": CacheSpec(kind="faster_cache"),
    "taylorseer": CacheSpec(kind="taylorseer"),
}


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory) -> str:
    return str(make_tiny_family("flux", tmp_path_factory.mktemp("models") / "tiny-flux"))


def _attention_projections(generator: DiffusersGenerator) -> list[int]:
    """A counter of the transformer's attention query projections run: work a cache skips."""
    calls = [0]
    for name, module in generator.pipe.transformer.named_modules():
        if name.endswith("attn.to_q"):
            module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _images(generator: DiffusersGenerator, prompts=("a red circle", "a cat on a boat")) -> np.ndarray:
    return generator.generate(list(prompts), [None] * len(prompts), [1, 2][: len(prompts)], KEY).numpy()


@pytest.fixture(scope="module")
def uncached(tiny_flux) -> tuple[np.ndarray, int]:
    generator = DiffusersGenerator(tiny_flux, "float32", "cpu")
    calls = _attention_projections(generator)
    return _images(generator), calls[0]


@pytest.mark.parametrize("kind", CACHES)
def test_cache_skips_attention_and_repeats_byte_for_byte(tiny_flux, uncached, kind):
    reference, full_calls = uncached
    generator = DiffusersGenerator(tiny_flux, "float32", "cpu", speed=SpeedOptions(cache=CACHES[kind]))
    calls = _attention_projections(generator)
    first = _images(generator)
    assert 0 < calls[0] < full_calls, "some steps reused instead of computed"
    assert np.abs(first.astype(int) - reference.astype(int)).max() <= 16, "the same pictures, nearly"
    _images(generator, prompts=("a blue star",))  # another batch between: no state carried over
    assert np.array_equal(_images(generator), first)
    again = DiffusersGenerator(tiny_flux, "float32", "cpu", speed=SpeedOptions(cache=CACHES[kind]))
    assert np.array_equal(_images(again), first), "a re-run (a new actor) makes the same bytes"


def test_cache_of_a_family_without_hooks_is_refused_in_one_line(tiny_model):
    with pytest.raises(ImagemillError, match=r"^speed.cache \(pyramid\) is not supported for StableDiff"):
        DiffusersGenerator(tiny_model, "float32", "cpu", speed=SpeedOptions(cache=CACHES["pyramid"]))


def test_cache_is_in_the_fingerprint_and_takes_only_its_kinds_settings(tmp_path):
    base = {
        "input": {"path": str(tmp_path)},
        "output": {"path": str(tmp_path / "o")},
        "model": {"source": "x/y"},
    }
    spec = imagemill.build_spec({**base, "speed": {"cache": {"kind": "taylorseer", "interval": 3}}})
    cache = spec.fingerprint()["speed"]["cache"]
    assert cache["kind"] == "taylorseer" and cache["interval"] == 3
    other = imagemill.build_spec({**base, "speed": {"cache": {"kind": "taylorseer", "interval": 4}}})
    uncached = imagemill.build_spec(base)
    assert len({str(s.fingerprint()) for s in (spec, other, uncached)}) == 3  # a resume may change none
    with pytest.raises(ImagemillError, match="threshold do not apply to kind: pyramid"):
        imagemill.build_spec({**base, "speed": {"cache": {"kind": "pyramid", "threshold": 0.1}}})


def test_cache_with_image_to_image_is_refused_in_one_line(tiny_flux):
    """FLUX's image-to-image pipeline marks no timestep or cache context for the hooks to read."""
    with pytest.raises(
        ImagemillError, match=r"^speed.cache \(first_block\) is not supported for FluxImg2Img"
    ):
        DiffusersGenerator(
            tiny_flux, "float32", "cpu", speed=SpeedOptions(cache=CACHES["first_block"]), image_to_image=True
        )
