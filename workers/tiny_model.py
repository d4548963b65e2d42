"""A tiny random-weight Stable-Diffusion pipeline, built offline.

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
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

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


def _corpus() -> list[str]:
    """A deterministic English corpus: every word, plus short phrases combining the word lists."""
    colours, shapes, positions, objects = (s.split() for s in (COLOURS, SHAPES, POSITIONS, OBJECTS))
    words = [*colours, *shapes, *positions, *objects, *WORDS.split()]
    phrases = [f"a {c} {s} in the {p}" for c, s, p in itertools.product(colours, shapes, positions)]
    phrases += [
        f"a photo of a {c} {o}, {w}" for c, o, w in itertools.product(colours, objects, WORDS.split())
    ]
    return words + phrases


def train_tokenizer(out_dir: Path, vocab_size: int = 2048) -> CLIPTokenizer:
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
    bpe.train_from_iterator(_corpus(), trainer=trainer)
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


def _text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def _unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        norm_num_groups=8,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
    )


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        sample_size=64,
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 32),
        norm_num_groups=8,
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    )


def make_tiny_model(out_dir: str | os.PathLike) -> Path:
    """Write a tiny random-weight Stable Diffusion pipeline to ``out_dir`` and return its path.

    The same call always writes the same weights. Default image size is 64x64; any width and height
    that are multiples of 8 work. Load it with
    ``DiffusionPipeline.from_pretrained(out_dir, use_safetensors=True)``.
    """
    out = Path(out_dir)
    tokenizer = train_tokenizer(out / "tokenizer")
    with torch.random.fork_rng(devices=[]):  # seed for the weights without touching the caller's RNG
        torch.manual_seed(SEED)
        text_encoder = _text_encoder(tokenizer)
        torch.manual_seed(SEED)
        unet = _unet()
        torch.manual_seed(SEED)
        vae = _vae()
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
