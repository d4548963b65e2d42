"""A tiny random-weight causal language model, built offline, for prompt-expansion tests and benchmarks.

No weights can be downloaded where the tests run, yet prompt expansion needs a real transformers model
directory that loads through the normal path (``AutoModelForCausalLM`` and ``AutoTokenizer``) and
generates. ``make_tiny_lm`` writes one: a two-layer Llama with seeded random weights (about 40K
parameters) and a word-level tokenizer over the tiny SD model's English words, so that what it
writes, while meaningless, is readable words.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from imagemill.testing.tiny_model import COLOURS, OBJECTS, POSITIONS, SHAPES, WORDS

SEED = 0
BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
EXTRA_WORDS = "describe one sentence photo detailed , . : 0 1 2 3 4 5 6 7 8 9"


def _tokenizer() -> PreTrainedTokenizerFast:
    words = " ".join((COLOURS, SHAPES, POSITIONS, OBJECTS, WORDS, EXTRA_WORDS)).split()
    vocab = {token: i for i, token in enumerate(dict.fromkeys([PAD, BOS, EOS, UNK, *words]))}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    word_level.normalizer = normalizers.Lowercase()
    word_level.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=word_level, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK
    )


def make_tiny_lm(out_dir: str | os.PathLike, hidden_size: int = 32, num_layers: int = 2) -> Path:
    """Write a tiny random-weight Llama causal LM and its tokenizer to ``out_dir``; return its path.

    The same call always writes the same weights. Benchmarks make it larger with the two sizes.
    """
    out = Path(out_dir)
    tokenizer = _tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):  # seed for the weights without touching the caller's RNG
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
