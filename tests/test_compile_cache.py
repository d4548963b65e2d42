"""`speed.compile_cache`: what one actor compiled is loaded by the next, under a key that never hands
a different torch, device or shape someone else's compiled code; and it stays out of the fingerprint."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import pickle
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import imagemill
from imagemill.core.compile_cache_key import KEY_VARIABLE, check_compile_cache_key, compile_cache_env
from imagemill.core.layout import OutputLayout
from imagemill.core.write_gate import OwnedOutput
from imagemill.workers.generators.contract import BatchKey
from imagemill.workers.generators.diffusion.compile_cache import (
    CompileCache,
    artifact_name,
    load_compiled,
    save_compiled,
)

SHAPE = BatchKey(width=64, height=64, num_inference_steps=4, guidance_scale=5.0)
SECRET = "compile-cache-key-" + "s3cr3t" * 6  # a distinctive key, looked for in every log line


@pytest.fixture
def signing_key(monkeypatch) -> str:
    """The compile cache's key in this process's environment, as the driver's check requires."""
    monkeypatch.setenv(KEY_VARIABLE, SECRET)
    return SECRET


def _cached_spec(tmp_path: Path, **sections: dict) -> imagemill.JobSpec:
    """A job with a compile cache in tmp_path/cc; "eager" traces as inductor does, without its minutes
    of C++ compiling here. `sections` replace the spec's sections whole."""
    return imagemill.build_spec(
        {
            "input": {"path": str(tmp_path)},
            "output": {"path": str(tmp_path / "out")},
            "model": {"source": "x/y"},
            "speed": {"compile": True, "compile_backend": "eager", "compile_cache": str(tmp_path / "cc")},
            **sections,
        }
    )


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


def test_compiled_code_saved_by_one_actor_is_loaded_only_under_its_key(tmp_path, monkeypatch, signing_key):
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
    tmp_path, tiny_model, monkeypatch, signing_key
):
    from imagemill.workers.generators.diffusion.generator import DiffusersGenerator
    from imagemill.workers.generators.diffusion.speed import SpeedOptions

    events: list[str] = []
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: events.append("save") or (b"k", None))
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda data: events.append("load"))
    spec = _cached_spec(
        tmp_path,
        model={"source": tiny_model},
        generation={"width": 32, "height": 32, "num_inference_steps": 2},
        workers={"batch_size": 2},
    )
    torch._dynamo.reset()
    try:
        DiffusersGenerator(tiny_model, "float32", "cpu", speed=SpeedOptions.from_spec(spec))
        assert events == ["save"] and len(list((tmp_path / "cc").iterdir())) == 1
        DiffusersGenerator(tiny_model, "float32", "cpu", speed=SpeedOptions.from_spec(spec))
        assert events == ["save", "load"], "the second actor loads and saves nothing"
    finally:
        torch._dynamo.reset()


class _Payload:
    """What a crafted artifact unpickles into: a call of the attacker's choosing (here: make a folder)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _crafted_artifact(tmp_path: Path) -> bytes:
    """A real torch cache artifact whose key is a folder outside any cache (torch writes the content
    there) and whose content runs code when unpickled (as torch does on load where Triton is usable)."""
    from torch.compiler._cache import CacheArtifactFactory, CacheArtifactManager, _serialize_single_cache
    from torch.utils._appending_byte_serializer import AppendingByteSerializer

    CacheArtifactManager._ensure_cache_artifacts_registered()
    content = pickle.dumps(_Payload(str(tmp_path / "code-ran")))
    artifact = CacheArtifactFactory.create("inductor", str(tmp_path / "written-outside"), content)
    serializer = AppendingByteSerializer(serialize_fn=_serialize_single_cache)
    serializer.extend([("inductor", [artifact])])
    return serializer.to_bytes()


def _signed_by(key: str, name: str, data: bytes) -> bytes:
    """`data` as a cache file signed with `key` (another key than the job's: an attacker's guess)."""
    signature = hmac.new(key.encode(), name.encode() + b"\0" + data, hashlib.sha256).hexdigest()
    return signature.encode() + b"\n" + data


TAMPERINGS = {
    "unsigned (as main wrote it)": lambda name, data: data,
    "signed with another key": lambda name, data: _signed_by("not-the-job-key" * 3, name, data),
    "signed, then changed": lambda name, data: _signed_by(SECRET, name, b"harmless")[:65] + data,
    "signed for another name": lambda name, data: _signed_by(SECRET, "inductor-other.bin", data),
}


@pytest.mark.parametrize("tamper", TAMPERINGS, ids=list(TAMPERINGS))
def test_a_tampered_artifact_never_reaches_torch_and_is_refused_in_one_line(
    tmp_path, monkeypatch, caplog, signing_key, tamper
):
    cache = CompileCache(str(tmp_path / "cache"), compiled='{"model": "a"}')
    name = artifact_name(cache.compiled, SHAPE, "cpu")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / name).write_bytes(TAMPERINGS[tamper](name, _crafted_artifact(tmp_path)))
    with caplog.at_level(logging.DEBUG):
        assert not load_compiled(cache, SHAPE, "cpu"), "refused: the actor compiles from scratch"
    assert not (tmp_path / "code-ran").exists() and not (tmp_path / "written-outside").exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert name in warnings[0] and KEY_VARIABLE in warnings[0] and "compiling from scratch" in warnings[0]
    assert SECRET not in caplog.text


def test_without_the_key_a_compile_cache_is_refused_in_one_line_naming_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_VARIABLE, raising=False)
    spec = _cached_spec(tmp_path)
    for check in (lambda: check_compile_cache_key(spec.speed), lambda: compile_cache_env(spec.speed)):
        with pytest.raises(imagemill.ImagemillError) as refused:
            check()
        message = str(refused.value)
        assert KEY_VARIABLE in message and "speed.compile_cache" in message and "\n" not in message
    with pytest.raises(imagemill.ImagemillError, match=KEY_VARIABLE):  # an actor without it loads nothing
        load_compiled(CompileCache(str(tmp_path / "cc")), SHAPE, "cpu")
    uncached = _cached_spec(tmp_path, speed={"compile": True})
    check_compile_cache_key(uncached.speed)
    assert compile_cache_env(uncached.speed) == {}, "no key is asked for, or sent, without a cache"


def test_the_actor_compiles_a_tampered_artifact_from_scratch_and_replaces_it_signed(
    tmp_path, tiny_model, monkeypatch, caplog, signing_key
):
    from imagemill.workers.generators.diffusion.generator import DiffusersGenerator
    from imagemill.workers.generators.diffusion.speed import SpeedOptions

    saved: list[str] = []
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: saved.append("save") or (b"k", None))
    spec = _cached_spec(
        tmp_path,
        model={"source": tiny_model},
        generation={"width": 32, "height": 32, "num_inference_steps": 2},
        workers={"batch_size": 2},
    )
    options = SpeedOptions.from_spec(spec)
    (tmp_path / "cc").mkdir()
    path = tmp_path / "cc" / artifact_name(options.compile_cache.compiled, options.warm_up, "cpu")
    path.write_bytes(_crafted_artifact(tmp_path))
    torch._dynamo.reset()
    try:
        with caplog.at_level(logging.DEBUG):
            DiffusersGenerator(tiny_model, "float32", "cpu", speed=options)
    finally:
        torch._dynamo.reset()
    assert not (tmp_path / "code-ran").exists() and not (tmp_path / "written-outside").exists()
    assert saved == ["save"], "compiled from scratch and saved"
    loaded: list[bytes] = []
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", loaded.append)
    assert load_compiled(options.compile_cache, options.warm_up, "cpu") and loaded == [b"k"], "now signed"
    assert SECRET.encode() not in path.read_bytes() and SECRET not in caplog.text


def test_the_key_reaches_an_actor_through_its_runtime_env_and_no_record(tmp_path, ray_session, signing_key):
    """The session's Ray started without the key: an actor has it only if the scheduler sends it."""
    from imagemill.cli.submit import write_job_spec
    from imagemill.execution.scheduler import ShardScheduler

    spec = _cached_spec(tmp_path, model={"source": "x/y", "device": "cpu"}, workers={"num_workers": 1})
    output = OwnedOutput.unleased(OutputLayout(spec.output.path))
    options = ShardScheduler(spec, output, lambda _: None).actor_options

    class Probe:
        def key(self) -> str | None:
            return os.environ.get(KEY_VARIABLE)

    probe = ray_session.remote(Probe).options(runtime_env=options["runtime_env"]).remote()
    assert ray_session.get(probe.key.remote(), timeout=300) == SECRET
    ray_session.kill(probe)
    write_job_spec(spec, tmp_path)
    assert SECRET not in json.dumps(spec.redacted()) and SECRET not in str(spec)
    assert all(SECRET not in f.read_text() for f in tmp_path.iterdir() if f.is_file())


def test_the_driver_hides_the_key_from_every_line_it_prints(tmp_path, caplog, signing_key):
    """A Ray error about an actor's runtime_env may quote it: `imagemill run` redacts it like a
    storage option's value."""
    from imagemill.cli.redaction import hiding, job_secrets

    spec = _cached_spec(tmp_path)
    with pytest.raises(imagemill.ImagemillError) as raised, hiding(job_secrets(spec)):
        logging.getLogger("ray").warning(
            "runtime_env {'env_vars': {'%s': '%s'}} failed", KEY_VARIABLE, SECRET
        )
        raise imagemill.ImagemillError(f"actor died: env_vars={SECRET}")
    assert SECRET not in caplog.text and SECRET not in str(raised.value)
    assert KEY_VARIABLE in caplog.text, "the variable's name is shown, its value is not"
