"""Janus(-Pro) image generation through transformers: an LLM samples image tokens, a VQ decoder paints them.

transformers' `JanusForConditionalGeneration.generate(generation_mode="image")` samples every row from
the global RNG, so a row's image would depend on its batch. This module runs the same loop itself
(prompt through the chat template, <begin_of_image>, one image token per step from the generation
head, classifier-free guidance against an unconditional branch, the KV cache carried over) and draws
each row's randomness from a CPU generator seeded with the row's seed alone.
"""

from __future__ import annotations

import torch

from imagemill.core.spec import JobSpec
from imagemill.workers.console import quiet_model_libraries
from imagemill.workers.generators.contract import BatchKey
from imagemill.workers.loading import Pretrained


class JanusGenerator:
    stage_timer = None  # one loop of text and image tokens: no text-encode/denoise/decode split
    scheduler_name = a1111_sampler = None  # no diffusers scheduler to name
    token_slices = 1  # one process draws each image

    def __init__(
        self,
        source: Pretrained | str,
        dtype: str,
        device: str,
    ):
        """`source`: the Janus model (a hub id, local directory or URL, or a `Pretrained` with its
        storage options and safetensors rule)."""
        # transformers is imported here, not at the top, so that the driver never pays for importing it.
        import transformers

        quiet_model_libraries()
        model = self.model_source = Pretrained.model(source)  # its files resolved once (provenance)
        self.model = model.weights(transformers.JanusForConditionalGeneration, dtype=getattr(torch, dtype))
        self.model.to(device).eval()
        self.processor = model.files(transformers.JanusProcessor)
        self.device = device
        tokenizer = self.processor.tokenizer
        self.keep_ids = torch.tensor(  # what Janus keeps of a prompt in the unconditional branch
            [tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids(tokenizer.boi_token)], device=device
        )
        self.pad_id = tokenizer.pad_token_id
        config = self.model.config
        self.image_tokens = config.vision_config.num_image_tokens
        # The VQ decoder turns a square grid of tokens into pixels, doubling the side at each level after
        # the first: its output size is fixed by the config, whatever the job asks for.
        self.size = config.vq_config.num_patches * 2 ** (len(config.vq_config.channel_multiplier) - 1)
        # The Llama's context holds the prompt and then the image tokens.
        limit = min(
            tokenizer.model_max_length, config.text_config.max_position_embeddings - self.image_tokens
        )
        overhead = len(self._encode([""]).input_ids[0])  # BOS, the chat template, <begin_of_image>
        self.max_prompt_tokens = max(limit - overhead, 1)
        image_processor = self.processor.image_processor
        self.image_mean = torch.tensor(image_processor.image_mean, device=device)
        self.image_std = torch.tensor(image_processor.image_std, device=device)

    @classmethod
    def from_spec(cls, spec: JobSpec, device: str) -> JanusGenerator:
        model = spec.model
        return cls(Pretrained.of(model, "model"), model.dtype, device)

    def _prompt_tokens(self, prompts: list[str]) -> list[list[tuple[int, int]]]:
        """Each prompt's token character spans, as the tokenizer sees the text alone."""
        return self.processor.tokenizer(prompts, add_special_tokens=False, return_offsets_mapping=True)[
            "offset_mapping"
        ]

    def truncated(self, prompts: list[str]) -> list[bool]:
        """Whether each prompt is longer than the model's context leaves for it; generate cuts it then."""
        return [len(spans) > self.max_prompt_tokens for spans in self._prompt_tokens(prompts)]

    def _cut(self, prompts: list[str]) -> list[str]:
        """Prompts cut before their first token that does not fit, so that the image tokens fit in the
        context. (Cutting after the last one that fits would keep a whole character whose bytes only
        partly fit.)"""
        limit = self.max_prompt_tokens
        return [
            prompt[: spans[limit][0]] if len(spans) > limit else prompt
            for prompt, spans in zip(prompts, self._prompt_tokens(prompts), strict=True)
        ]

    def _encode(self, texts: list[str]):
        """Texts through the chat template as the user's turn, then <begin_of_image>, left-padded."""
        conversations = [[{"role": "user", "content": [{"type": "text", "text": text}]}] for text in texts]
        if self.processor.chat_template is not None:
            texts = self.processor.apply_chat_template(
                conversations, add_generation_prompt=True, tokenize=False
            )
        return self.processor(text=texts, generation_mode="image", padding=True, return_tensors="pt")

    def _inputs(
        self, prompts: list[str], negative_prompts: list[str | None]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask of the conditional rows, then of the unconditional ones.

        A row without a negative prompt gets Janus's own unconditional input: its prompt with every
        token but BOS and <begin_of_image> replaced by padding. A row with one uses it as the text of
        its unconditional branch, so guidance steers away from it.
        """
        negatives = [negative or prompt for prompt, negative in zip(prompts, negative_prompts, strict=True)]
        encoded = self._encode(self._cut(prompts + negatives))
        ids, mask = encoded.input_ids.to(self.device), encoded.attention_mask.to(self.device)
        janus_style = torch.tensor(
            [False] * len(prompts) + [not negative for negative in negative_prompts], device=self.device
        )
        blank = janus_style[:, None] & ~torch.isin(ids, self.keep_ids)
        return ids.masked_fill(blank, self.pad_id), mask

    def _check_size(self, key: BatchKey) -> None:
        if (key.width, key.height) != (self.size, self.size):
            raise ValueError(
                f"this Janus model makes {self.size}x{self.size} images only, not {key.width}x{key.height}; "
                f"set generation.width and generation.height (or the rows' width/height) to {self.size}"
            )

    @staticmethod
    def _draw(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        """One token per row: where the row's cumulative probability passes its uniform number."""
        cdf = logits.softmax(-1).cumsum(-1)
        drawn = torch.searchsorted(cdf, uniforms[:, None] * cdf[:, -1:]).squeeze(1)
        return drawn.clamp(max=cdf.shape[-1] - 1)  # rounding can leave the last cdf value below 1

    @torch.inference_mode()
    def generate(
        self, prompts: list[str], negative_prompts: list[str | None], seeds: list[int], key: BatchKey
    ) -> torch.Tensor:
        """Images as an (N, S, S, 3) uint8 tensor on the model's device, S the model's image size.

        Each image token is drawn by inverting the guided distribution's CDF at a uniform number taken
        from the row's own CPU generator, so a row's draws depend on its seed alone, on any device.
        `key.num_inference_steps` has no meaning here (Janus always samples one token per grid cell).
        A size other than the model's raises ValueError, which makes the batch's rows errors.
        """
        self._check_size(key)
        ids, mask = self._inputs(prompts, negative_prompts)
        rows = len(prompts)
        uniforms = torch.stack(
            [
                torch.rand(self.image_tokens, generator=torch.Generator("cpu").manual_seed(seed))
                for seed in seeds
            ]
        ).to(self.device)
        language_model = self.model.model.language_model
        embeddings = self.model.get_input_embeddings()(ids)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: each row counts from its first token
        cache = None
        tokens = torch.empty((rows, self.image_tokens), dtype=torch.long, device=self.device)
        for step in range(self.image_tokens):
            output = language_model(
                inputs_embeds=embeddings,
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
            )
            cache = output.cache
            logits = self.model.model.generation_head(output.last_hidden_state[:, -1]).float()
            conditional, unconditional = logits[:rows], logits[rows:]
            guided = unconditional + key.guidance_scale * (conditional - unconditional)
            tokens[:, step] = self._draw(guided, uniforms[:, step])
            # Both branches continue from the token drawn for the row.
            embeddings = self.model.prepare_embeddings_for_image_generation(
                tokens[:, step].repeat(2)[:, None]
            )
            positions = positions[:, -1:] + 1
            mask = torch.cat([mask, mask.new_ones((2 * rows, 1))], dim=1)
        pixels = self.model.decode_image_tokens(tokens).float() * self.image_std + self.image_mean
        return (pixels * 255).round().clamp(0, 255).to(torch.uint8)
