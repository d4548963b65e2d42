"""A tiny random-weight super-resolution network that spandrel recognises: Real-ESRGAN's Compact
(SRVGGNetCompact) layout, written as the state dict a trained one is, in `model.safetensors`.

Its output is the nearest-neighbour enlargement plus a small seeded residual of `convs + 2` 3x3
convolutions, so its receptive field reaches `convs + 2` input pixels: a tile overlap of that or more
gives tiles identical to the whole image's result. Built by hand (no spandrel import): the test then
loads it through the job's real path, where spandrel must recognise it from its keys alone.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from imagemill.testing.tiny_model import SEED


def make_tiny_upscaler(out_dir: str | os.PathLike, scale: int = 2, features: int = 8, convs: int = 2) -> Path:
    """Write `out_dir/model.safetensors`, a Compact network enlarging `scale` times; returns `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(SEED + scale)

    def conv(index: int, outputs: int, inputs: int) -> dict[str, torch.Tensor]:
        weight = torch.randn(outputs, inputs, 3, 3, generator=generator) * 0.05
        return {f"body.{index}.weight": weight, f"body.{index}.bias": torch.zeros(outputs)}

    def prelu(index: int) -> dict[str, torch.Tensor]:
        return {f"body.{index}.weight": torch.full((features,), 0.25)}

    state = {**conv(0, features, 3), **prelu(1)}
    for k in range(convs):
        state |= {**conv(2 + 2 * k, features, features), **prelu(3 + 2 * k)}
    state |= conv(2 + 2 * convs, 3 * scale * scale, features)
    save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(out / "model.safetensors"))
    return out


def make_tiny_diffusers_upscaler(out_dir: str | os.PathLike, pipeline: str) -> Path:
    """Write a tiny random-weight diffusers upscaler with save_pretrained, loaded back by the job's real
    path: `x4`, StableDiffusionUpscalePipeline (a 7-channel UNet on the low-resolution image and its
    latents, a VAE of scale 4, noise_level as the UNet's class label), or `latent`,
    StableDiffusionLatentUpscalePipeline (a K-diffusion UNet on latents enlarged x2, conditioned on the
    CLIP text encoder's pooled output). Both use the tiny CLIP tokenizer and text encoder."""
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionLatentUpscalePipeline,
        StableDiffusionUpscalePipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel

    from imagemill.testing.tiny_model import clip_config, tiny_unet, tiny_vae, train_clip_tokenizer

    out = Path(out_dir)
    tokenizer = train_clip_tokenizer(out / "tokenizer")
    with torch.random.fork_rng(devices=[]):  # the same call writes the same weights
        torch.manual_seed(SEED)
        text_encoder = CLIPTextModel(clip_config(tokenizer))
        torch.manual_seed(SEED)
        if pipeline == "x4":
            # the tiny SD UNet on the latents and the low-resolution image; noise_level is its class label
            unet = tiny_unet(in_channels=7, num_class_embeds=1000)
            torch.manual_seed(SEED)
            vae = tiny_vae((16, 32, 32), scaling_factor=0.08333)  # scale 4, as the released one
            pipe = StableDiffusionUpscalePipeline(
                vae=vae,
                text_encoder=text_encoder,
                tokenizer=tokenizer,
                unet=unet,
                low_res_scheduler=DDPMScheduler(),
                scheduler=DDIMScheduler(prediction_type="v_prediction"),
                max_noise_level=350,
            )
        elif pipeline == "latent":
            unet = UNet2DConditionModel(
                act_fn="gelu",
                attention_head_dim=8,
                norm_num_groups=None,
                block_out_channels=(32, 32, 64, 64),
                time_cond_proj_dim=160,  # 128 noise-level features and the 32 of the pooled text
                conv_in_kernel=1,
                conv_out_kernel=1,
                cross_attention_dim=32,
                down_block_types=(
                    "KDownBlock2D",
                    "KCrossAttnDownBlock2D",
                    "KCrossAttnDownBlock2D",
                    "KCrossAttnDownBlock2D",
                ),
                in_channels=8,
                mid_block_type=None,
                only_cross_attention=False,
                out_channels=5,
                resnet_time_scale_shift="scale_shift",
                time_embedding_type="fourier",
                timestep_post_act="gelu",
                up_block_types=(
                    "KCrossAttnUpBlock2D",
                    "KCrossAttnUpBlock2D",
                    "KCrossAttnUpBlock2D",
                    "KUpBlock2D",
                ),
            )
            torch.manual_seed(SEED)
            vae = tiny_vae((16, 32))
            pipe = StableDiffusionLatentUpscalePipeline(
                vae=vae,
                text_encoder=text_encoder,
                tokenizer=tokenizer,
                unet=unet,
                scheduler=EulerDiscreteScheduler(prediction_type="sample"),
            )
        else:
            raise ValueError(f"no tiny diffusers upscaler {pipeline!r}: x4 or latent")
    pipe.save_pretrained(out, safe_serialization=True)
    return out
