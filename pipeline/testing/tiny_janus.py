"""A tiny random-weight Janus model (JanusForConditionalGeneration + JanusProcessor), built offline.

Janus-Pro cannot be downloaded where the tests run, yet `model.kind: janus` needs a real model directory
that loads through the normal path (``from_pretrained(path, use_safetensors=True)``). ``make_tiny_janus``
writes one: a 2-layer Llama, a 1-layer vision tower, a small VQ decoder making 32x32 images from a 4x4
grid of image tokens, and a Llama-style (SentencePiece-like, byte fallback) BPE tokenizer trained here,
with the special tokens Janus's processor and image generation use. The images are noise; every code
path is the real one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    JanusConfig,
    JanusForConditionalGeneration,
    JanusImageProcessorPil,
    JanusProcessor,
    JanusVisionConfig,
    JanusVQVAEConfig,
    LlamaConfig,
    LlamaTokenizer,
)

from imagemill.testing.tiny_model import SEED, corpus

IMAGE_SIZE = 32  # pixels per side of every image the tiny model makes
PATCHES = 4  # image tokens per side: 16 tokens per image, each decoded to an 8x8 pixel patch
MAX_POSITIONS = 64  # the Llama's context: prompt plus the 16 image tokens (long prompts get cut)
BOS, EOS, PAD, UNK = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<unk>"
IMAGE_TOKENS = {
    "image_token": "<image_placeholder>",
    "boi_token": "<begin_of_image>",
    "eoi_token": "<end_of_image>",
}
# Janus-Pro's conversation format, reduced to what image generation uses: one user turn, then the
# assistant's turn, after which the processor appends <begin_of_image>.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|User|>: {{ message['content'][0]['text'] | trim }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}<|Assistant|>:{% endif %}"
)


def _tokenizer(vocab_size: int = 600) -> LlamaTokenizer:
    """A Llama tokenizer (metaspace BPE with byte fallback) with merges trained on the test corpus."""
    specials = [UNK, BOS, EOS, PAD, *IMAGE_TOKENS.values()]
    bpe = Tokenizer(models.BPE(unk_token=UNK))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    bpe.train_from_iterator(corpus(), trainer=trainer)
    trained = json.loads(bpe.to_str())["model"]
    # Llama's layout: specials, then the 256 byte tokens (any text tokenizes without <unk>), then merges.
    tokens = [
        *specials,
        *(f"<0x{b:02X}>" for b in range(256)),
        *sorted(trained["vocab"], key=trained["vocab"].get),
    ]
    return LlamaTokenizer(
        vocab={token: i for i, token in enumerate(dict.fromkeys(tokens))},
        merges=[tuple(merge) for merge in trained["merges"]],
        add_bos_token=True,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens=IMAGE_TOKENS,
        model_max_length=MAX_POSITIONS,
    )


def _config(tokenizer: LlamaTokenizer) -> JanusConfig:
    hidden = 32
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        # Janus initialises every part from the text config's range. At the default 0.02 the random
        # generation head's logits are nearly flat, and guidance barely moves a draw; 0.1 makes them
        # differ enough between prompts that guidance and negative prompts visibly change images.
        initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = JanusVisionConfig(
        hidden_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=IMAGE_SIZE // PATCHES,
        projection_dim=hidden,
        depth=1,
        num_image_tokens=PATCHES**2,
    )
    vq = JanusVQVAEConfig(
        embed_dim=8,
        num_embeddings=64,  # the image-token codebook
        latent_channels=32,
        base_channels=32,  # the decoder's GroupNorms take 32 groups
        channel_multiplier=[1, 1, 1, 1],  # three 2x upsamplings: 4 patches -> 32 pixels
        num_res_blocks=1,
        projection_dim=hidden,
        image_token_embed_dim=hidden,
        num_hidden_layers=1,
    )
    return JanusConfig(
        text_config=text,
        vision_config=vision,
        vq_config=vq,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKENS["image_token"]),
    )


def make_tiny_janus(out_dir: str | os.PathLike) -> Path:
    """Write a tiny random-weight Janus model and its processor to ``out_dir``; return its path.

    The same call always writes the same weights. It makes 32x32 images only. Load it with
    ``JanusForConditionalGeneration.from_pretrained(out_dir, use_safetensors=True)`` and
    ``JanusProcessor.from_pretrained(out_dir)``.
    """
    out = Path(out_dir)
    tokenizer = _tokenizer()
    config = _config(tokenizer)
    with torch.random.fork_rng(devices=[]):  # seed for the weights without touching the caller's RNG
        torch.manual_seed(SEED)
        model = JanusForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        guidance_scale=5.0,
        do_sample=True,
        generation_kwargs={"boi_token_id": tokenizer.convert_tokens_to_ids(IMAGE_TOKENS["boi_token"])},
    )
    model.save_pretrained(out, safe_serialization=True)
    image_processor = JanusImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    processor = JanusProcessor(
        image_processor, tokenizer, chat_template=CHAT_TEMPLATE, num_image_tokens=PATCHES**2
    )
    processor.save_pretrained(out)
    return out
