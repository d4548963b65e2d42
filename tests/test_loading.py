"""One loading policy: every pretrained component goes through workers/loading.py, so the safetensors
rule and the URL → local copy (model_source.fetch_model_dir) hold for all of them alike."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from diffusers import AutoencoderTiny

from imagemill.core.errors import ImagemillError
from imagemill.testing.tiny_model import make_tiny_autoencoder
from imagemill.workers.generators.diffusion.generator import DiffusersGenerator
from imagemill.workers.generators.diffusion.speed import SpeedOptions
from imagemill.workers.loading import Pretrained

ROOT = Path(__file__).resolve().parent.parent
LOADER = ROOT / "workers" / "loading.py"
NOT_RUNTIME = (ROOT / "pipeline" / "testing", ROOT / "pipeline" / "demo")  # builders, not job code
# Calls that load pretrained files or copy them to the node: only the loading helper may make them.
LOADING_CALLS = re.compile(r"\b(from_pretrained|load_lora_weights|fetch_model_dir)\(")


@pytest.fixture(scope="module")
def pickled_tiny_vae(tmp_path_factory) -> str:
    """A tiny VAE that fits the tiny model, saved with only pickled (.bin) weights."""
    root = tmp_path_factory.mktemp("pickled-taesd")
    vae = AutoencoderTiny.from_pretrained(make_tiny_autoencoder(root / "safe"))
    vae.save_pretrained(root / "pickled", safe_serialization=False)
    assert [path.name for path in (root / "pickled").glob("*.bin")] and not list(
        (root / "pickled").glob("*.safetensors")
    )
    return str(root / "pickled")


def test_tiny_vae_with_only_pickled_weights_is_refused_under_safetensors_only(tiny_model, pickled_tiny_vae):
    with pytest.raises(ImagemillError) as refused:
        DiffusersGenerator(tiny_model, "float32", "cpu", speed=SpeedOptions(tiny_vae=pickled_tiny_vae))
    message = str(refused.value)
    assert "\n" not in message
    assert "speed.tiny_vae" in message and pickled_tiny_vae in message and "model.safetensors_only" in message


def test_tiny_vae_with_pickled_weights_loads_when_the_user_opts_in(tiny_model, pickled_tiny_vae):
    options = SpeedOptions(tiny_vae=pickled_tiny_vae)
    trusted = Pretrained(tiny_model, "model.source", safetensors_only=False)
    generator = DiffusersGenerator(trusted, "float32", "cpu", speed=options)
    assert isinstance(generator.pipe.vae, AutoencoderTiny)


def _runtime_sources() -> list[Path]:
    files = [*(ROOT / "workers").rglob("*.py"), *(ROOT / "pipeline").rglob("*.py")]
    return [path for path in files if not any(path.is_relative_to(folder) for folder in NOT_RUNTIME)]


def test_only_the_loading_helper_loads_pretrained_files():
    """`from_pretrained(`, `load_lora_weights(` and `fetch_model_dir(` appear in runtime code only in
    workers/loading.py (and fetch_model_dir's own definition), so no component can skip its rules."""
    offenders = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in _runtime_sources()
        if path != LOADER
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if LOADING_CALLS.search(line) and not line.startswith("def fetch_model_dir(")
    ]
    assert offenders == []
    assert LOADING_CALLS.search(LOADER.read_text()), "the helper itself is where they are called"
