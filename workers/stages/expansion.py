"""Prompt expansion: a causal language model rewrites each prompt through the spec's template.

`PromptExpander` loads the model and tokenizer once (left padding, so every row's new tokens start at
the same position) and expands a batch of prompts per `generate` call, keeping only the new tokens,
cleaned to one line. An expansion that comes out empty (the model ended at once, or wrote only
whitespace or special tokens) falls back to the input prompt as given, so the row is still drawn
from something meaningful; the shard's stats count these (`expansion_unchanged`).

Determinism. Greedy decoding (`do_sample: false`) needs no randomness. Sampling draws each row's
tokens from its own `torch.Generator`, seeded from (job seed, variant id) (`seeds.expansion_seed`),
through a logits processor: the tokens a row draws depend on its seed and its own logits, not on the
other rows of its batch or on the global RNG. Its logits are computed in a batch, though, and like
the images (docs/ARCHITECTURE.md, "Determinism") they may differ in the last bits between batch
shapes. What is guaranteed is therefore the same as for images: expansion batches are cut from the
shard alone, in shard order (`expansion_batches`), so a re-run or a resumed job gives
byte-identical expanded prompts, whatever the actor, node or placement (on the same kind of device);
a different `expansion.batch_size` may, rarely, change a sampled token where two were nearly tied.

`ShardExpansion` runs a shard's expansion for the worker, a few batches ahead of its generator, and
`fill(rows)` waits only for the batches those rows need.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from imagemill.core.spec import ExpansionSpec
from imagemill.workers.console import quiet_model_libraries
from imagemill.workers.loading import Pretrained
from imagemill.workers.rows import Row
from imagemill.workers.seeds import expansion_seed

BATCHES_AHEAD = 3  # expansion batches a shard keeps started beyond the one its generator needs now


class _PerRowSampler:
    """A logits processor that samples each row's next token with the row's own generator.

    It returns logits where only the drawn token is finite, so `generate` runs in greedy mode and
    picks it: transformers' own sampling draws from the global RNG, shared by the whole batch.
    """

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float, device: str):
        from transformers import TemperatureLogitsWarper, TopPLogitsWarper

        self.generators = [torch.Generator(device).manual_seed(seed) for seed in seeds]
        self.warpers = [TemperatureLogitsWarper(temperature)]
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        probs = torch.softmax(scores.float(), dim=-1)
        tokens = torch.cat(
            [torch.multinomial(p, 1, generator=g) for p, g in zip(probs, self.generators, strict=True)]
        )
        drawn = torch.full_like(scores, -float("inf"))
        drawn[torch.arange(len(tokens), device=scores.device), tokens] = 0.0
        return drawn


def clean(text: str) -> str:
    """One line: whitespace runs (newlines included) become one space, ends stripped."""
    return " ".join(text.split())


class PromptExpander:
    """The expansion model on one device; `expand` turns a batch of prompts into expanded prompts."""

    def __init__(self, spec: ExpansionSpec, device: str):
        import transformers

        quiet_model_libraries()
        source = Pretrained.of(spec, "expansion")
        self.tokenizer = source.files(transformers.AutoTokenizer, padding_side="left")
        if self.tokenizer.pad_token is None:  # many causal LMs have none; padding is masked anyway
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = source.weights(transformers.AutoModelForCausalLM, dtype=getattr(torch, spec.dtype))
        self.model.to(device).eval()
        self.spec = spec
        self.device = device
        # The spec's settings are the whole decoding configuration; only the model's end-of-text
        # tokens (some models have several) come from its own generation config.
        eos = self.model.generation_config.eos_token_id
        self.generation_config = transformers.GenerationConfig(
            max_new_tokens=spec.max_new_tokens,
            do_sample=False,
            eos_token_id=self.tokenizer.eos_token_id if eos is None else eos,
            pad_token_id=self.tokenizer.pad_token_id,
        )

    def ready(self) -> str:
        return self.device

    @torch.inference_mode()
    def expand(self, prompts: list[str], seeds: list[int]) -> list[str]:
        """The expanded prompts, in order; an empty one is the input prompt itself (see the module doc).

        `seeds` seed the sampling of each row (unused when greedy).
        """
        from transformers import LogitsProcessorList

        texts = [self.spec.fill(prompt) for prompt in prompts]
        inputs = self.tokenizer(texts, return_tensors="pt", padding=True).to(self.device)
        processors = LogitsProcessorList()
        if self.spec.do_sample:
            processors.append(_PerRowSampler(seeds, self.spec.temperature, self.spec.top_p, self.device))
        output = self.model.generate(
            **inputs, generation_config=self.generation_config, logits_processor=processors
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        expanded = [clean(text) for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
        return [text or prompt for text, prompt in zip(expanded, prompts, strict=True)]


def expansion_batches(rows: list[Row], batch_size: int) -> list[list[Row]]:
    """The shard's valid rows, one per variant id (its images share the expansion), in shard order,
    cut into batches: a function of the shard alone, so every run expands the same batches."""
    firsts: dict[str, Row] = {}
    for row in rows:
        if row.error is None:
            firsts.setdefault(row.variant_id, row)
    unique = list(firsts.values())
    return [unique[i : i + batch_size] for i in range(0, len(unique), batch_size)]


class ShardExpansion:
    """One shard's expansion, batch by batch, kept `BATCHES_AHEAD` batches ahead of the generator.

    `submit(prompts, seeds)` starts one batch and returns a handle that `wait(handle)` turns into its
    expanded prompts: a Ray ObjectRef and `ray.get` for a pool (the batches ahead run while the
    generator works), or a deferred call and its call on the worker itself. Only a few batches are
    in flight per shard, so the shards of several workers share a pool's queue fairly.
    """

    def __init__(
        self,
        rows: list[Row],
        spec: ExpansionSpec,
        job_seed: int,
        submit: Callable[[list[str], list[int]], Any],
        wait: Callable[[Any], list[str]],
    ):
        self.job_seed = job_seed
        self.submit = submit
        self.wait = wait
        self.batches = expansion_batches(rows, spec.batch_size)
        self.batch_of = {row.variant_id: index for index, batch in enumerate(self.batches) for row in batch}
        self.handles: list[Any] = []
        self.expanded: dict[str, str] = {}
        self.seconds = 0.0  # spent by the worker on expansion: running it, or waiting for the pool
        self.unchanged = 0  # expansions that came out empty (or as the prompt itself): the prompt is kept
        self._start_up_to(BATCHES_AHEAD - 1)

    def _start_up_to(self, last: int) -> None:
        tick = time.time()
        while len(self.handles) <= min(last, len(self.batches) - 1):
            batch = self.batches[len(self.handles)]
            seeds = [expansion_seed(self.job_seed, row.variant_id) for row in batch]
            self.handles.append(self.submit([str(row.prompt) for row in batch], seeds))
        self.seconds += time.time() - tick

    def fill(self, rows: list[Row]) -> None:
        """Set `expanded_prompt` on these (valid) rows, waiting for the batches that hold them."""
        needed = sorted({self.batch_of[row.variant_id] for row in rows})
        self._start_up_to(needed[-1] + BATCHES_AHEAD)
        tick = time.time()
        for index in needed:
            batch = self.batches[index]
            if batch[0].variant_id in self.expanded:
                continue
            for row, text in zip(batch, self.wait(self.handles[index]), strict=True):
                self.expanded[row.variant_id] = text
                self.unchanged += text == row.prompt
        for row in rows:
            row.expanded_prompt = self.expanded[row.variant_id]
        self.seconds += time.time() - tick
