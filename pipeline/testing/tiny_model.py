"""A tiny random-weight Stable-Diffusion pipeline, and a tiny CLIP model to score its images, built offline.

No weights can be downloaded where the tests run, yet they need a real diffusers pipeline directory
that loads through the normal path (``DiffusionPipeline.from_pretrained(path,
use_safetensors=True)``) and generates images. ``make_tiny_model`` writes one: a tiny UNet, VAE and CLIP
text encoder with seeded random weights, a DDIM scheduler, and a byte-level BPE ``CLIPTokenizer``
trained here on a small English word list (the demo model, ``demo_model.py``, reuses it). The images are
noise, but every code path is the real one.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
)

SEED = 0
MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's own pre-tokenisation: split into words, numbers and punctuation runs, then map bytes to unicode.
CLIP_SPLIT = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)

COLOURS = "red orange yellow green blue purple pink brown black white grey gold silver teal cyan magenta"
SHAPES = "circle square triangle rectangle star heart hexagon oval diamond cube sphere cone pyramid ring line"
POSITIONS = "left right top bottom center middle above below behind beside near far corner edge inside"
OBJECTS = (
    "cat dog bird fish horse tree flower house car boat mountain river lake sea sky cloud sun moon city "
    "street forest garden field road bridge castle robot person woman man child apple chair table lamp "
    "window door book cup bottle clock"
)
WORDS = (
    "a an the of in on at with and or over under small large big tiny huge bright dark light old new "
    "photo painting drawing sketch picture image render portrait landscape close up view style art "
    "beautiful detailed simple sharp soft blurry night day morning evening sunset winter summer rain snow"
)


def corpus() -> list[str]:
    """A deterministic English corpus: every word, plus short phrases combining the word lists."""
    colours, shapes, positions, objects = (s.split() for s in (COLOURS, SHAPES, POSITIONS, OBJECTS))
    words = [*colours, *shapes, *positions, *objects, *WORDS.split()]
    phrases = [f"a {c} {s} in the {p}" for c, s, p in itertools.product(colours, shapes, positions)]
    phrases += [
        f"a photo of a {c} {o}, {w}" for c, o, w in itertools.product(colours, objects, WORDS.split())
    ]
    return words + phrases


def train_clip_tokenizer(out_dir: Path, vocab_size: int = 2048) -> CLIPTokenizer:
    """Train byte-level BPE merges the way CLIP tokenizes; write vocab.json/merges.txt; load them."""
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    word_ends = [c + "</w>" for c in alphabet]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=alphabet,
        # Fixing the ids of the word-final symbols up front makes training deterministic: otherwise they are
        # numbered in hash-map order, which changes from process to process, and merges with equal counts
        # (ties are broken by symbol id) come out in a different order.
        special_tokens=word_ends,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator(corpus(), trainer=trainer)
    merges = [
        tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
        for m in json.loads(bpe.to_str())["model"]["merges"]
    ]

    # CLIP's vocab layout: every byte, every byte ending a word, each merge's result, then the specials.
    # Having all 512 single-symbol tokens means any unicode string tokenizes without an unknown token.
    tokens = alphabet + word_ends + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_txt = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (out_dir / "merges.txt").write_text(merges_txt, encoding="utf-8")
    return CLIPTokenizer.from_pretrained(out_dir, model_max_length=MAX_LENGTH)


def clip_config(tokenizer: CLIPTokenizer, **overrides) -> CLIPTextConfig:
    """A 2-layer CLIP text encoder's config for `tokenizer`; `overrides` change fields (projection_dim)."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **overrides,
    )


def tiny_unet(**config) -> UNet2DConditionModel:
    """The tiny SD UNet; `config` overrides fields (SDXL adds its pooled-text and size conditioning)."""
    return UNet2DConditionModel(
        **{
            "sample_size": 32,
            "in_channels": 4,
            "out_channels": 4,
            "block_out_channels": (16, 32),
            "norm_num_groups": 8,
            "layers_per_block": 1,
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
            "cross_attention_dim": 32,
            "attention_head_dim": (2, 4),
            **config,
        }
    )


def tiny_vae(
    block_out_channels: tuple[int, ...] = (16, 32), latent_channels: int = 4, **config
) -> AutoencoderKL:
    """A tiny KL VAE; it scales images down by 2 per block after the first (SD's VAE: 8, four blocks)."""
    return AutoencoderKL(
        sample_size=64,
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        block_out_channels=block_out_channels,
        norm_num_groups=8,
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(block_out_channels),
        **config,
    )


def make_tiny_model(out_dir: str | os.PathLike) -> Path:
    """Write a tiny random-weight Stable Diffusion pipeline to ``out_dir`` and return its path.

    The same call always writes the same weights. Default image size is 64x64; any width and height
    that are multiples of 8 work. Load it with
    ``DiffusionPipeline.from_pretrained(out_dir, use_safetensors=True)``.
    """
    out = Path(out_dir)
    tokenizer = train_clip_tokenizer(out / "tokenizer")
    with torch.random.fork_rng(devices=[]):  # seed for the weights without touching the caller's RNG
        torch.manual_seed(SEED)
        text_encoder = CLIPTextModel(clip_config(tokenizer))
        torch.manual_seed(SEED)
        unet = tiny_unet()
        torch.manual_seed(SEED)
        vae = tiny_vae()
    scheduler = DDIMScheduler(  # Stable Diffusion 1.x's schedule
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
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
    pipe.save_pretrained(out, safe_serialization=True)
    return out


CLIP_IMAGE_SIZE = 32


def make_tiny_clip(out_dir: str | os.PathLike) -> Path:
    """Write a tiny random-weight CLIPModel with its tokenizer and image processor config to ``out_dir``.

    The scorer's path loads it as it loads a real one (``CLIPModel.from_pretrained``, the tokenizer,
    ``preprocessor_config.json``): 32-pixel inputs in 8-pixel patches, so a 64-pixel image is resized
    and a non-square one cropped. Its scores are meaningless but deterministic (same weights every call).
    """
    out = Path(out_dir)
    tokenizer = train_clip_tokenizer(out)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=CLIP_IMAGE_SIZE,
        patch_size=8,
    )
    config = CLIPConfig(
        text_config=clip_config(tokenizer).to_dict(), vision_config=vision.to_dict(), projection_dim=16
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = CLIPModel(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": CLIP_IMAGE_SIZE},
        crop_size={"height": CLIP_IMAGE_SIZE, "width": CLIP_IMAGE_SIZE},
    )
    processor.save_pretrained(out)
    return out


def make_tiny_autoencoder(out_dir: str | os.PathLike, latent_channels: int = 4) -> Path:
    """Write a random-weight ``AutoencoderTiny`` (the TAESD family) that decodes the tiny model's latents
    (2x upscale) to ``out_dir``, for `speed.tiny_vae`; with other latent channels it fits no model here."""
    from diffusers import AutoencoderTiny

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        vae = AutoencoderTiny(
            latent_channels=latent_channels,
            encoder_block_out_channels=(8, 8),
            decoder_block_out_channels=(8, 8),
            num_encoder_blocks=(1, 1),
            num_decoder_blocks=(1, 1),
        )
    vae.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)
