"""Text encoding is done once per distinct text: duplicate prompts and negative prompts are free."""

from __future__ import annotations

import numpy as np
import torch

from imagemill.workers.generators.diffusion.generator import DiffusersGenerator
from imagemill.workers.rows import BatchKey

KEY = BatchKey(width=32, height=32, num_inference_steps=1, guidance_scale=5.0)


def _count_encoded_rows(generator: DiffusersGenerator) -> list[int]:
    """Rows of each text-encoder call, appended as they happen."""
    calls: list[int] = []
    generator.pipe.text_encoder.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    return calls


def test_duplicate_prompts_and_negatives_are_encoded_once(tiny_model):
    generator = DiffusersGenerator(tiny_model, "float32", "cpu")
    calls = _count_encoded_rows(generator)

    prompts = ["a red circle", "a red circle", "a blue star", "a red circle"]
    generator.generate(prompts, [None, None, "blurry", None], [1, 2, 3, 4], KEY)
    assert calls == [2, 2], "two distinct prompts, two distinct negatives ('' and 'blurry')"

    generator.generate(["a blue star", "a green square"], [None, None], [5, 6], KEY)
    assert calls == [2, 2, 1], "only the new prompt; '' and 'a blue star' come from the cache"

    generator.generate(["a green square"], [None], [7], BatchKey(32, 32, 1, guidance_scale=1.0))
    assert calls == [2, 2, 1], "no guidance: no negative needed, and the prompt is cached"


def test_cached_embeddings_give_the_images_the_pipeline_gives(tiny_model):
    generator = DiffusersGenerator(tiny_model, "float32", "cpu")
    prompts, negatives, seeds = ["a cat", "a dog", "a cat"], [None, "ugly", None], [11, 12, 13]
    generator.generate(["a dog"], ["ugly"], [0], KEY)  # warm the cache: later calls mix cached and new
    ours = generator.generate(prompts, negatives, seeds, KEY)

    with torch.inference_mode():
        theirs = generator.pipe(
            prompt=prompts,
            negative_prompt=[n or "" for n in negatives],
            num_inference_steps=1,
            guidance_scale=5.0,
            width=32,
            height=32,
            generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],
            output_type="pt",
        ).images
    expected = (theirs * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(ours.numpy(), expected)
