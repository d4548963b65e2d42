"""Tiny random-weight pipelines of each text-to-image family imagemill runs, built offline.

Each builder writes a normal diffusers directory (``save_pretrained``, safetensors) from the family's own
classes: SDXL (two CLIP encoders, pooled embeddings, size conditioning), SD3 (two CLIPs and a T5, an
MMDiT), FLUX (CLIP + T5, a guidance-distilled flux transformer), PixArt-Σ (T5, a DiT) and Sana (a
Gemma-2 encoder, a linear DiT, a DC-AE). Tokenizers are trained here on the tiny model's corpus: CLIP's
byte-level BPE (tiny_model.py), a T5 Unigram and a Gemma byte-fallback BPE. Layers are a few channels
wide: the images are noise, but every loading and generation code path is the family's real one.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from diffusers import (
    AutoencoderDC,
    DDIMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionXLPipeline,
)
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    CLIPTextModel,
    CLIPTextModelWithProjection,
    Gemma2Config,
    Gemma2Model,
    GemmaTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from imagemill.testing import FAMILIES
from imagemill.testing.tiny_model import (
    SEED,
    clip_config,
    corpus,
    make_tiny_model,
    tiny_unet,
    tiny_vae,
    train_clip_tokenizer,
)

# SD3's and FLUX's VAE: four blocks (images scale down 8x, so with 2x2 patches sizes are multiples of
# 16, as in the real models), no quant convs, latents shifted before they are scaled.
FLOW_VAE = {
    "block_out_channels": (8, 8, 8, 8),
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "shift_factor": 0.0609,
    "scaling_factor": 1.5035,
}
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]


@contextlib.contextmanager
def _seeded() -> Iterator[None]:
    """Seed the weights without touching the caller's RNG: the same call writes the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        yield


def _t5_tokenizer(vocab_size: int = 1000) -> T5Tokenizer:
    """A SentencePiece-style Unigram (▁ marks word starts), wrapped as T5's tokenizer: <pad> <eos> <unk>."""
    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        show_progress=False,
    )
    unigram.train_from_iterator(corpus(), trainer=trainer)
    vocab = [tuple(piece) for piece in json.loads(unigram.to_str())["model"]["vocab"]]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _gemma_tokenizer(vocab_size: int = 1000) -> GemmaTokenizer:
    """Gemma's layout: specials, the 256 byte tokens (any text encodes, via byte fallback), BPE merges."""
    bpe = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    # Trained on words ("▁red"), not whole phrases: as fast as the CLIP tokenizer's training.
    bpe.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    byte_tokens = [f"<0x{byte:02X}>" for byte in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=GEMMA_SPECIALS + byte_tokens, show_progress=False
    )
    bpe.train_from_iterator((text.replace(" ", "▁") for text in corpus()), trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [
        tuple(merge) if isinstance(merge, list) else tuple(merge.split(" ")) for merge in model["merges"]
    ]
    return GemmaTokenizer(vocab=model["vocab"], merges=merges, add_bos_token=True)


def _t5_encoder(tokenizer: T5Tokenizer, d_model: int = 32) -> T5EncoderModel:
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return T5EncoderModel(config)


def _save(pipe: DiffusionPipeline, out: Path) -> Path:
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def make_tiny_sdxl(out: Path) -> Path:
    """SDXL: the UNet also takes the second encoder's pooled embedding and the six size numbers."""
    tokenizer = train_clip_tokenizer(out / "tokenizer")
    with _seeded():
        text_encoder = CLIPTextModel(clip_config(tokenizer))
        text_encoder_2 = CLIPTextModelWithProjection(clip_config(tokenizer, projection_dim=32))
        unet = tiny_unet(
            cross_attention_dim=64,  # both encoders' hidden states side by side
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,  # six size numbers + pooled embedding
        )
        vae = tiny_vae()
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
    return _save(pipe, out)


def make_tiny_sd3(out: Path) -> Path:
    """SD3: two CLIPs (pooled side by side) and a T5, whose width the CLIP states are padded to."""
    tokenizer = train_clip_tokenizer(out / "tokenizer")
    t5_tokenizer = _t5_tokenizer()
    with _seeded():
        text_encoder = CLIPTextModelWithProjection(clip_config(tokenizer, projection_dim=32))
        text_encoder_2 = CLIPTextModelWithProjection(clip_config(tokenizer, projection_dim=32))
        text_encoder_3 = _t5_encoder(t5_tokenizer, d_model=64)
        transformer = SD3Transformer2DModel(
            sample_size=32,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=1,
            attention_head_dim=8,
            num_attention_heads=4,
            caption_projection_dim=32,
            joint_attention_dim=64,
            pooled_projection_dim=64,
            pos_embed_max_size=32,
        )
        vae = tiny_vae(**FLOW_VAE)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        text_encoder_3=text_encoder_3,
        tokenizer_3=t5_tokenizer,
    )
    return _save(pipe, out)


def make_tiny_flux(out: Path) -> Path:
    """FLUX.1-dev's layout: CLIP pooled + T5 states, guidance embedded in the transformer (distilled)."""
    tokenizer = train_clip_tokenizer(out / "tokenizer")
    t5_tokenizer = _t5_tokenizer()
    with _seeded():
        text_encoder = CLIPTextModel(clip_config(tokenizer))
        text_encoder_2 = _t5_encoder(t5_tokenizer)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,  # 4 latent channels, packed 2x2
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=True,
            axes_dims_rope=(4, 4, 8),
        )
        vae = tiny_vae(**FLOW_VAE)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )
    return _save(pipe, out)


def make_tiny_pixart(out: Path) -> Path:
    """PixArt-Σ: a T5 encoder and a DiT with adaLN-single that also predicts the variance."""
    t5_tokenizer = _t5_tokenizer()
    with _seeded():
        text_encoder = _t5_encoder(t5_tokenizer)
        transformer = PixArtTransformer2DModel(
            sample_size=16,
            num_layers=1,
            patch_size=2,
            attention_head_dim=8,
            num_attention_heads=3,
            caption_channels=32,
            in_channels=4,
            out_channels=8,
            cross_attention_dim=24,
        )
        vae = tiny_vae()
    pipe = PixArtSigmaPipeline(
        tokenizer=t5_tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=DDIMScheduler(),
    )
    return _save(pipe, out)


def make_tiny_sana(out: Path) -> Path:
    """Sana: a Gemma-2 decoder as text encoder, a linear-attention DiT and a deep-compression VAE."""
    tokenizer = _gemma_tokenizer()
    with _seeded():
        text_encoder = Gemma2Model(
            Gemma2Config(
                vocab_size=len(tokenizer),
                hidden_size=8,
                intermediate_size=16,
                head_dim=4,
                num_attention_heads=2,
                num_key_value_heads=2,
                num_hidden_layers=1,
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        )
        transformer = SanaTransformer2DModel(
            in_channels=4,
            out_channels=4,
            num_layers=1,
            num_attention_heads=2,
            attention_head_dim=4,
            num_cross_attention_heads=2,
            cross_attention_head_dim=4,
            cross_attention_dim=8,
            caption_channels=8,
            sample_size=32,
        )
        vae = AutoencoderDC(
            latent_channels=4,
            attention_head_dim=2,
            encoder_block_types=("ResBlock", "EfficientViTBlock"),
            decoder_block_types=("ResBlock", "EfficientViTBlock"),
            encoder_block_out_channels=(8, 8),
            decoder_block_out_channels=(8, 8),
            encoder_qkv_multiscales=((), (5,)),
            decoder_qkv_multiscales=((), (5,)),
            encoder_layers_per_block=(1, 1),
            decoder_layers_per_block=(1, 1),
            upsample_block_type="interpolate",
            downsample_block_type="conv",
            scaling_factor=0.41407,
        )
    pipe = SanaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
    )
    return _save(pipe, out)


BUILDERS: dict[str, Callable[[Path], Path]] = dict(
    zip(
        FAMILIES,
        (make_tiny_model, make_tiny_sdxl, make_tiny_sd3, make_tiny_flux, make_tiny_pixart, make_tiny_sana),
        strict=True,
    )
)


def make_tiny_family(family: str, out_dir: str | os.PathLike) -> Path:
    """Write a tiny random-weight pipeline of `family` (a key of BUILDERS) to `out_dir`; return its path."""
    return BUILDERS[family](Path(out_dir))
