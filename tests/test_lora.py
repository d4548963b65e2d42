"""LoRA weights named in the spec: loaded by every actor, active with their scale, errors in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import as_pixels, read_metadata, write_prompt_files
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image

import imagemill
from imagemill.core.errors import ImagemillError
from imagemill.core.spec import LoraSpec
from imagemill.testing.tiny_model import tiny_unet
from imagemill.workers.generators.diffusion.generator import DiffusersGenerator

GENERATION = {"width": 32, "height": 32, "num_inference_steps": 2, "guidance_scale": 5.0}
SCALE = 0.7


def _save_lora(unet, out: Path) -> Path:
    """A rank-4 LoRA on the UNet's attention projections, with random (not zero) up-projections."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
        unet.add_adapter(config)
        with torch.no_grad():
            for name, parameter in unet.named_parameters():
                if "lora_B" in name:  # peft starts these at zero: the LoRA would change nothing
                    parameter.normal_(0, 0.5)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=layers, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def lora_dir(tiny_model, tmp_path_factory) -> str:
    unet = DiffusionPipeline.from_pretrained(tiny_model, use_safetensors=True).unet
    return str(_save_lora(unet, tmp_path_factory.mktemp("lora") / "tiny-sd-lora"))


def _spec(tmp_path, tiny_model: str, name: str, lora: list[dict]) -> imagemill.JobSpec:
    return imagemill.build_spec(
        {
            "input": {"path": str(tmp_path / "prompts")},
            "output": {"path": str(tmp_path / name)},
            "model": {"source": tiny_model, "lora": lora},
            "generation": GENERATION,
            "workers": {"num_workers": 1, "batch_size": 4},
        }
    )


def _by_hand(pipe, prompts: list[str], seeds: list[int]) -> np.ndarray:
    images = pipe(
        prompt=prompts,
        negative_prompt=[""] * len(prompts),
        generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],
        output_type="pt",
        **GENERATION,
    ).images
    return as_pixels(images)


def test_job_with_a_lora_makes_the_images_of_a_pipeline_with_it_loaded_by_hand(
    ray_session, tmp_path, tiny_model, lora_dir
):
    write_prompt_files(str(tmp_path / "prompts"), n_files=1, rows_per_file=3, row_group_size=3)
    # A single .safetensors file, as LoRAs are often shared; the hand-made pipeline loads its directory.
    lora_file = f"{lora_dir}/pytorch_lora_weights.safetensors"
    spec = _spec(tmp_path, tiny_model, "out", [{"source": lora_file, "scale": SCALE}])
    plain = _spec(tmp_path, tiny_model, "out", [])
    assert spec.fingerprint() != plain.fingerprint()
    assert imagemill.run(spec, progress=False).ok == 3
    rows = read_metadata(str(tmp_path / "out")).to_pylist()
    ours = np.stack([np.asarray(Image.open(tmp_path / "out" / row["path"])) for row in rows])

    pipe = DiffusionPipeline.from_pretrained(tiny_model, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(lora_dir, adapter_name="by-hand")
    pipe.set_adapters(["by-hand"], adapter_weights=[SCALE])
    prompts, seeds = [row["prompt"] for row in rows], [row["seed"] for row in rows]
    # The actor ran torch on one thread (num_cpus_per_worker: 1); the thread count moves the last bits.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            np.testing.assert_array_equal(ours, _by_hand(pipe, prompts, seeds))
            pipe.disable_lora()
            without = _by_hand(pipe, prompts, seeds)
    finally:
        torch.set_num_threads(threads)
    assert all(np.abs(a.astype(int) - b).max() > 10 for a, b in zip(ours, without, strict=True)), (
        "the LoRA must change every image"
    )


def test_missing_lora_stops_the_job_in_one_line(ray_session, tmp_path, tiny_model):
    write_prompt_files(str(tmp_path / "prompts"), n_files=1, rows_per_file=1, row_group_size=1)
    spec = _spec(tmp_path, tiny_model, "out", [{"source": str(tmp_path / "no-such-lora")}])
    with pytest.raises(ImagemillError) as error:
        imagemill.run(spec, progress=False)
    assert str(error.value) == f"LoRA not found: {tmp_path / 'no-such-lora'} (model.lora[0].source)"


def test_lora_for_another_model_is_refused_in_one_line(tmp_path, tiny_model):
    other = str(_save_lora(tiny_unet(cross_attention_dim=64), tmp_path / "sdxl-sized-lora"))
    with pytest.raises(ImagemillError) as error:
        DiffusersGenerator(tiny_model, "float32", "cpu", loras=[LoraSpec(source=other)])
    message = str(error.value)
    assert message.startswith(f"LoRA {other} does not load into this model: ") and "size mismatch" in message
    assert "\n" not in message
