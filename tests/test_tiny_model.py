import os
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline

from imagemill.testing.tiny_model import make_tiny_model

pytestmark = pytest.mark.model  # its tests build or load a model (the tiers: tests/conftest.py)

LONG_PROMPT = " ".join(["a big blue star above a small green cube in the top left corner"] * 12)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def pipe(model_dir: Path) -> DiffusionPipeline:
    pipe = DiffusionPipeline.from_pretrained(model_dir, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe: DiffusionPipeline, prompts: list[str], **kwargs) -> torch.Tensor:
    generator = torch.Generator("cpu").manual_seed(0)
    return pipe(prompts, num_inference_steps=2, generator=generator, output_type="pt", **kwargs).images


def test_layout(model_dir: Path) -> None:
    assert (model_dir / "model_index.json").is_file()
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (model_dir / sub).is_dir()
    assert not list(model_dir.rglob("*.bin"))
    assert sum(f.stat().st_size for f in model_dir.rglob("*") if f.is_file()) < 5_000_000


@pytest.mark.parametrize(("width", "height"), [(64, 64), (48, 32)])
def test_generates_images(pipe: DiffusionPipeline, width: int, height: int) -> None:
    images = _generate(
        pipe, ["a red circle in the top left corner", "a blue square"], width=width, height=height
    )
    assert images.shape == (2, 3, height, width)
    assert torch.isfinite(images).all()


def test_default_size_is_64(pipe: DiffusionPipeline) -> None:
    assert _generate(pipe, ["a green star"]).shape == (1, 3, 64, 64)


def test_long_unicode_and_empty_prompts(pipe: DiffusionPipeline) -> None:
    tokenizer = pipe.tokenizer
    assert len(tokenizer(LONG_PROMPT).input_ids) > tokenizer.model_max_length == 77
    unicode_prompt = "un chat 🐱 sur la fenêtre — 猫, ÆØÅ"
    assert tokenizer.unk_token_id not in tokenizer(unicode_prompt).input_ids[1:-1]
    images = _generate(pipe, [LONG_PROMPT, unicode_prompt, ""], negative_prompt=["", LONG_PROMPT, "x"])
    assert images.shape == (3, 3, 64, 64)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_build(model_dir: Path, tmp_path: Path) -> None:
    first = _files(model_dir)
    assert len([name for name in first if name.endswith(".safetensors")]) == 3
    assert _files(make_tiny_model(tmp_path / "again")) == first
    # The tokenizer trainer iterates hash maps, whose order changes between processes: build in another one.
    code = (
        "import sys; from imagemill.testing.tiny_model import make_tiny_model; make_tiny_model(sys.argv[1])"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "other")], check=True, capture_output=True)
    assert _files(tmp_path / "other") == first
