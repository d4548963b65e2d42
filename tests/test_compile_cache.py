"""`speed.compile_cache`: what one actor compiled is loaded by the next, under a key that never hands
a different torch, device or shape someone else's compiled code; and it stays out of the fingerprint."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import imagemill
from imagemill.workers.generators.contract import BatchKey
from imagemill.workers.generators.diffusion.compile_cache import (
    CompileCache,
    artifact_name,
    load_compiled,
    save_compiled,
)

SHAPE = BatchKey(width=64, height=64, num_inference_steps=4, guidance_scale=5.0)


def test_the_key_changes_with_torch_device_shape_and_what_is_compiled(monkeypatch):
    name = artifact_name('{"model": "a"}', SHAPE, "cpu")
    assert name == artifact_name('{"model": "a"}', SHAPE, "cpu"), "the same actor finds its own"
    # steps are not part of the compiled graph (one denoiser call per step)
    assert name == artifact_name('{"model": "a"}', replace(SHAPE, num_inference_steps=9), "cpu")
    other_shapes = [
        BatchKey(width=128, height=64, num_inference_steps=4, guidance_scale=5.0),
        BatchKey(width=64, height=128, num_inference_steps=4, guidance_scale=5.0),
        BatchKey(width=64, height=64, num_inference_steps=4, guidance_scale=1.0),  # no guidance batch
    ]
    others = {artifact_name('{"model": "b"}', SHAPE, "cpu")}
    others |= {artifact_name('{"model": "a"}', shape, "cpu") for shape in other_shapes}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    others.add(artifact_name('{"model": "a"}', SHAPE, "cuda"))
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    others.add(artifact_name('{"model": "a"}', SHAPE, "cpu"))
    assert name not in others and len(others) == 6


def test_compiled_code_saved_by_one_actor_is_loaded_only_under_its_key(tmp_path, monkeypatch):
    """Our side of the hand-over: torch's serialized caches (stood in for by known bytes here: a real
    Inductor compile takes minutes on CI; bench/compile_cache.py runs the real one) written under the
    key by the first actor, given back to torch by a later one with the same key, and by no other."""
    loaded: list[bytes] = []
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"compiled kernels", None))
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", loaded.append)
    cache = CompileCache(str(tmp_path / "cache"), compiled='{"model": "a"}')
    assert not load_compiled(cache, SHAPE, "cpu"), "nothing saved yet"
    save_compiled(cache, SHAPE, "cpu")
    saved = list((tmp_path / "cache").iterdir())
    assert [path.name for path in saved] == [artifact_name(cache.compiled, SHAPE, "cpu")]
    assert load_compiled(cache, SHAPE, "cpu") and loaded == [b"compiled kernels"], "a later actor loads it"
    other_shape = BatchKey(width=128, height=64, num_inference_steps=4, guidance_scale=5.0)
    assert not load_compiled(cache, other_shape, "cpu"), "another shape misses and compiles its own"
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    assert not load_compiled(cache, SHAPE, "cpu"), "another torch misses and compiles its own"
    assert loaded == [b"compiled kernels"]


def test_the_compile_cache_is_not_in_the_fingerprint_and_needs_compile(tmp_path):
    base = {
        "input": {"path": str(tmp_path)},
        "output": {"path": str(tmp_path / "o")},
        "model": {"source": "x/y"},
    }
    compiled = imagemill.build_spec({**base, "speed": {"compile": True}})
    cached = imagemill.build_spec({**base, "speed": {"compile": True, "compile_cache": "s3://b/cc"}})
    assert cached.fingerprint() == compiled.fingerprint()
    with pytest.raises(imagemill.ImagemillError, match="compile_cache .* needs compile: true"):
        imagemill.build_spec({**base, "speed": {"compile_cache": str(tmp_path)}})


def test_the_first_actor_saves_after_its_warm_up_and_the_next_loads_before_it(
    tmp_path, tiny_model, monkeypatch
):
    from imagemill.workers.generators.diffusion.generator import DiffusersGenerator
    from imagemill.workers.generators.diffusion.speed import SpeedOptions

    events: list[str] = []
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: events.append("save") or (b"k", None))
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda data: events.append("load"))
    spec = imagemill.build_spec(
        {
            "input": {"path": str(tmp_path)},
            "output": {"path": str(tmp_path / "out")},
            "model": {"source": tiny_model},
            "generation": {"width": 32, "height": 32, "num_inference_steps": 2},
            "workers": {"batch_size": 2},
            # "eager" traces as inductor does, without its minutes of C++ compiling here
            "speed": {"compile": True, "compile_backend": "eager", "compile_cache": str(tmp_path / "cc")},
        }
    )
    torch._dynamo.reset()
    try:
        DiffusersGenerator(tiny_model, "float32", "cpu", speed=SpeedOptions.from_spec(spec))
        assert events == ["save"] and len(list((tmp_path / "cc").iterdir())) == 1
        DiffusersGenerator(tiny_model, "float32", "cpu", speed=SpeedOptions.from_spec(spec))
        assert events == ["save", "load"], "the second actor loads and saves nothing"
    finally:
        torch._dynamo.reset()
