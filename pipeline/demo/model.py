"""The demo model: a small Stable Diffusion pipeline trained here, on CPU, to draw coloured shapes.

    python -m imagemill.demo.model train jobs/models/demo-shapes   # the shipped weights
    python -m imagemill.demo.model prompts jobs/demo_prompts.parquet

The demo job should show that prompts steer the picture, yet no weights can be downloaded, so the model
is trained from scratch on images drawn by ``demo_shapes`` ("a red circle on the left on a white
background"), with the held-out colour x shape x position triples never shown. It is a standard
``StableDiffusionPipeline`` directory (UNet, KL VAE, CLIP text encoder, the offline-trained CLIP tokenizer
of ``tiny_model``, a DDIM scheduler), so it loads through the job's real path. To train in minutes on two
CPU cores: 32x32 images, a small VAE that halves the size (trained first, on its own), a small UNet on
16x16x4 latents that predicts the clean latent (``prediction_type="sample"``: colour, shape and place
are settled at high noise, which that target weights most), DDPM's linear noise schedule (whose last
steps hold no trace of the image, so that only the prompt can say where the shape goes), and a small text
encoder trained with the UNet.

Training is seeded and single-threaded: the same command on the same machine writes the same weights.
The shipped weights (12000 UNet steps) took 4300 s of wall time here, on two CPU cores with a second
training run beside it. On held-out triples (tests/test_demo_model.py, the demo job's settings: 10
DDIM steps, guidance 3) they draw the prompt's colour and place in 180 of 180 images and its shape in
169 (94%). Shape is what takes steps: at guidance 5 it was right in 0.38 of held-out images at 900
steps (chance is 1/3), 0.64 at 2500, 0.8 at 4000 and 0.87 at 8000, while colour and place were right
in nearly all from 4000.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from imagemill.demo import shapes as demo_shapes
from imagemill.testing.tiny_model import train_clip_tokenizer

SEED = 0
IMAGES_PER_SCENE = 48  # jittered drawings of each training scene
CAPTION_DROP = 0.1  # share of empty captions, which teaches the unconditional branch of guidance
NO_BACKGROUND = 0.25  # share of captions that leave the background out
BATCH = 32


def _scheduler() -> DDIMScheduler:
    """DDPM's linear schedule, not Stable Diffusion's: on 16x16 latents SD's last steps keep enough signal
    for the UNet to place the shape where the noise happens to lean (and ignore the prompt's shape and
    place); this one's end is pure noise. Sampling starts at the last step; the UNet predicts the clean
    latent."""
    return DDIMScheduler(
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        clip_sample=False,
        set_alpha_to_one=False,
        timestep_spacing="trailing",
        steps_offset=1,  # unused with "trailing"; the pipeline warns and sets it if not 1
        prediction_type="sample",
    )


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        sample_size=demo_shapes.SIZE,
        latent_channels=4,
        block_out_channels=(16, 32),
        norm_num_groups=8,
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        mid_block_add_attention=False,  # flat shapes need no attention; it would cost 5x per step
    )


def _unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=demo_shapes.SIZE // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        norm_num_groups=16,
        layers_per_block=1,
        # Attention only at 8x8 and 4x4: at 16x16 it would double the cost of a training step.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
    )


def _text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def _dataset(rng: np.random.Generator) -> tuple[torch.Tensor, list[str]]:
    """Training images in [-1, 1], (N, 3, 32, 32), with captions (some empty, some without background)."""
    scenes = [s for s in demo_shapes.scenes(held_out=False) for _ in range(IMAGES_PER_SCENE)]
    images = np.stack([demo_shapes.draw(scene, rng) for scene in scenes])
    caption = demo_shapes.caption
    captions = [
        "" if rng.random() < CAPTION_DROP else caption(s, with_background=rng.random() >= NO_BACKGROUND)
        for s in scenes
    ]
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    return pixels, captions


def _log(stage: str, step: int, steps: int, loss: float, started: float) -> None:
    print(f"{stage} {step}/{steps} loss {loss:.4f} {time.monotonic() - started:.0f}s", flush=True)


def _train_vae(vae: AutoencoderKL, pixels: torch.Tensor, steps: int, generator: torch.Generator) -> None:
    """Reconstruction with a whisper of KL: flat-coloured shapes autoencode in a few hundred steps."""
    optimiser = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0)
    started = time.monotonic()
    for step in range(1, steps + 1):
        batch = pixels[torch.randint(len(pixels), (BATCH,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        loss = F.mse_loss(reconstruction, batch) + 1e-6 * posterior.kl().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % 100 == 0:
            _log("vae", step, steps, loss.item(), started)


@torch.no_grad()
def _latents(vae: AutoencoderKL, pixels: torch.Tensor) -> torch.Tensor:
    """The dataset's latents (posterior means), scaled to unit variance as the pipeline expects."""
    latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in pixels.split(256)])
    vae.register_to_config(scaling_factor=float(1 / latents.std()))
    return latents * vae.config.scaling_factor


def _train_unet(
    pipe: StableDiffusionPipeline,
    latents: torch.Tensor,
    captions: list[str],
    steps: int,
    generator: torch.Generator,
) -> None:
    """Denoising with the clean latent as target; the text encoder learns along, at a cosine-decayed rate."""
    unet, text_encoder, scheduler = pipe.unet, pipe.text_encoder, pipe.scheduler
    distinct = sorted(set(captions))
    tokens = pipe.tokenizer(distinct, padding="max_length", truncation=True, return_tensors="pt").input_ids
    caption_index = torch.tensor([distinct.index(c) for c in captions])
    params = [*unet.parameters(), *text_encoder.parameters()]
    warmup = max(1, min(200, steps // 10))
    optimiser = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: min(1.0, step / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
    )
    started, running = time.monotonic(), 0.0
    for step in range(1, steps + 1):
        rows = torch.randint(len(latents), (BATCH,), generator=generator)
        clean = latents[rows]
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(scheduler.config.num_train_timesteps, (len(rows),), generator=generator)
        context = text_encoder(tokens[caption_index[rows]])[0]
        predicted = unet(scheduler.add_noise(clean, noise, timesteps), timesteps, context).sample
        loss = F.mse_loss(predicted, clean)
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        schedule.step()
        running = 0.98 * running + 0.02 * loss.item() if step > 1 else loss.item()
        if step % 100 == 0:
            _log("unet", step, steps, running, started)


def train(out_dir: str | Path, vae_steps: int = 300, unet_steps: int = 12000) -> Path:
    """Train the demo model from scratch and save it as a diffusers pipeline directory (safetensors)."""
    out = Path(out_dir)
    # One thread: on two shared cores a second one mostly waits, and it makes the arithmetic's order fixed.
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    pixels, captions = _dataset(np.random.default_rng(SEED))
    print(f"{len(pixels)} training images of {len(set(captions))} captions", flush=True)
    tokenizer = train_clip_tokenizer(out / "tokenizer")
    pipe = StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=_text_encoder(tokenizer),
        tokenizer=tokenizer,
        unet=_unet(),
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    _train_vae(pipe.vae, pixels, vae_steps, generator)
    latents = _latents(pipe.vae.eval(), pixels)
    _train_unet(pipe, latents, captions, unet_steps, generator)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def write_prompts(path: str | Path, count: int = 64, row_group_size: int = 16) -> None:
    """The demo job's prompts: `count` scenes in a seeded shuffle, held-out triples included."""
    everything = demo_shapes.scenes(held_out=False) + demo_shapes.scenes(held_out=True)
    order = np.random.default_rng(SEED).permutation(len(everything))[:count]
    prompts = [demo_shapes.caption(everything[i]) for i in order]
    table = pa.table({"id": [f"demo-{i:03d}" for i in range(count)], "prompt": prompts})
    pq.write_table(table, path, row_group_size=row_group_size)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imagemill.demo.model", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    train_cmd = commands.add_parser("train", help="train the demo model into DIRECTORY")
    train_cmd.add_argument("directory")
    train_cmd.add_argument("--vae-steps", type=int, default=300)
    train_cmd.add_argument("--unet-steps", type=int, default=12000)
    prompts_cmd = commands.add_parser("prompts", help="write the demo job's prompt Parquet file")
    prompts_cmd.add_argument("path")
    args = parser.parse_args(argv)
    if args.command == "train":
        started = time.monotonic()
        train(args.directory, args.vae_steps, args.unet_steps)
        print(f"demo model written to {args.directory} in {time.monotonic() - started:.0f}s")
    else:
        write_prompts(args.path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
