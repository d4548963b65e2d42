"""A pipeline with Stable Diffusion 1.5's shapes and random fp16 weights, and a CLIP ViT-L/14-shaped
scorer, for GPU benchmarks.

No weights can be downloaded where the benchmarks run, but speed depends on shapes, not on weight
values: this is SD 1.5's published architecture (UNet 860M parameters, VAE, CLIP ViT-L/14 text
encoder) with random weights. Its tokenizer is the tiny model's; only the vocabulary size differs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
)

from imagemill.testing.tiny_model import make_tiny_model


def _tiny_tokenizer(out_dir: Path) -> CLIPTokenizer:
    tiny = make_tiny_model(Path(out_dir).with_name(Path(out_dir).name + "-tokenizer"))
    return CLIPTokenizer.from_pretrained(tiny / "tokenizer")


def _l14_text_config() -> CLIPTextConfig:
    """CLIP ViT-L/14's text tower: SD 1.5's text encoder, and the scorer's text side."""
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
    )


def make_clip_l14_shaped(out_dir: Path) -> Path:
    """A CLIPModel of ViT-L/14's shapes (428M parameters, 224² input), random weights, for the scorer."""
    tokenizer = _tiny_tokenizer(out_dir)
    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        hidden_act="quick_gelu",
    )
    torch.manual_seed(0)
    model = CLIPModel(
        CLIPConfig(
            text_config=_l14_text_config().to_dict(), vision_config=vision.to_dict(), projection_dim=768
        )
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    CLIPImageProcessorPil(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}
    ).save_pretrained(out_dir)
    return Path(out_dir)


def make_sd15_shaped_model(out_dir: Path) -> Path:
    tokenizer = _tiny_tokenizer(out_dir)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        sample_size=512,
    )
    text_encoder = CLIPTextModel(_l14_text_config())
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(torch.float16).save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)
