"""A pipeline with SDXL base 1.0's shapes and random fp16 weights, for GPU benchmarks at 1024² (issue #27).

As bench/sd15_shaped.py: speed depends on shapes, not weight values. SDXL's published architecture:
UNet 2.6B parameters (three levels 320/640/1280, 1/2/10 transformer blocks, cross-attention 2048, size
and pooled-text conditioning), the SD VAE at 1024², CLIP ViT-L/14's text tower and OpenCLIP bigG's
(1280 wide, 32 layers, projected). Built on the GPU where there is one (random initialisation of 3.5B
parameters on a CPU takes minutes). Its tokenizers are the tiny model's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from sd15_shaped import _l14_text_config, _tiny_tokenizer
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection


def make_sdxl_shaped_model(out_dir: Path) -> Path:
    tokenizer = _tiny_tokenizer(out_dir)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        unet = UNet2DConditionModel(
            sample_size=128,
            layers_per_block=2,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,  # six size numbers × 256 + the pooled 1280
        ).half()
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            sample_size=1024,
            scaling_factor=0.13025,
        ).half()
        text_encoder = CLIPTextModel(_l14_text_config()).half()
        text_encoder_2 = CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=1280,
                intermediate_size=5120,
                num_hidden_layers=32,
                num_attention_heads=20,
                max_position_embeddings=77,
                hidden_act="gelu",
                projection_dim=1280,
            )
        ).half()
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)
