"""Every pretrained component an actor loads, loaded under one policy.

The diffusers pipeline, the tiny VAE, LoRA weights, Janus, the CLIP scorer, the safety checker and
the prompt-expansion LM are all loaded through a `Pretrained` (tests/test_loading.py fails on a
`from_pretrained(` or `load_lora_weights(` anywhere else in the runtime code), so two rules hold for
each alike:

- where its files are: a URL is copied once to this node's cache (model_source.fetch_model_dir, which
  refuses keys that would land outside it); a local directory or hub id is used as it is;
- which weights may load: with `safetensors_only` only safetensors (`use_safetensors=True`), else
  safetensors where there are some and pickles otherwise (`None`, the libraries' default). Pickled
  weights can run code when loaded, so a refused load is a one-line error naming the setting.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field, replace
from typing import Any

from imagemill.core.errors import ImagemillError
from imagemill.core.model_source import fetch_model_dir
from imagemill.core.spec import PretrainedSection

CORRUPT = "Unable to load weights"  # how diffusers and transformers say a weights file did not read


@dataclass
class Pretrained:
    """A pretrained source as the job spec names it, and the rule its weights load under."""

    source: str  # hub id, local directory, or fsspec URL of a directory
    setting: str  # the spec field that names it, for errors: "model.source", "speed.tiny_vae", ...
    safetensors_only: bool = True
    rule: str = "model.safetensors_only"  # the spec field safetensors_only comes from
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def model(cls, source: Pretrained | str) -> Pretrained:
        """The model a generator is given: as it is, or a plain source under the default rule."""
        return source if isinstance(source, Pretrained) else cls(source, "model.source")

    @classmethod
    def of(cls, section: PretrainedSection, name: str) -> Pretrained:
        """The source of spec section `name` (model, scoring, expansion, safety, evaluation, upscale)."""
        return cls(
            section.source,
            f"{name}.source",
            section.safetensors_only,
            f"{name}.safetensors_only",
            section.storage_options,
        )

    def beside(self, source: str, setting: str) -> Pretrained:
        """Another source under this one's rule and storage options (a model's LoRAs and tiny VAE)."""
        return replace(self, source=source, setting=setting)

    @functools.cached_property
    def local(self) -> str:
        """What the libraries are given on this node: a local directory or a hub id."""
        return (
            str(fetch_model_dir(self.source, self.storage_options)) if "://" in self.source else self.source
        )

    @property
    def _use_safetensors(self) -> bool | None:
        # True refuses pickled weights; None prefers safetensors and falls back to them.
        return True if self.safetensors_only else None

    def weights(self, loader: Any, **kwargs: Any) -> Any:
        """`loader.from_pretrained` (a model or pipeline class) under the safetensors rule."""
        return self._refusing_pickles(loader.from_pretrained, self.local, **kwargs)

    def files(self, loader: Any, **kwargs: Any) -> Any:
        """`loader.from_pretrained` for a component without weights: tokenizer, processor."""
        return loader.from_pretrained(self.local, **kwargs)

    def safetensors_file(self, name: str) -> str:
        """The local path of the source's safetensors file `name`, for a network a library builds from
        a state dict (upscale's spandrel): from the copied or local directory, or the hub by its id.
        Only a safetensors file is ever read this way, so the safetensors rule holds whatever it says."""
        if not name.endswith(".safetensors"):
            raise ValueError(f"{name} is not a safetensors file")
        if os.path.isdir(self.local):
            path = os.path.join(self.local, name)
            if not os.path.isfile(path):
                raise ImagemillError(f"{self.setting} {self.source} has no {name}")
            return path
        from huggingface_hub import hf_hub_download

        try:
            return str(hf_hub_download(self.local, name))
        except Exception as exc:  # not a repo id, not in the cache offline, no such file, no network
            reason = " ".join(str(exc).split())[:200]
            raise ImagemillError(
                f"{self.setting} {self.source} has no {name}: not a local directory, and not from the "
                f"Hugging Face hub ({reason})"
            ) from None

    def lora_into(self, pipe: Any, **kwargs: Any) -> None:
        """diffusers' `pipe.load_lora_weights` under the safetensors rule."""
        self._refusing_pickles(pipe.load_lora_weights, self.local, **kwargs)

    def _refusing_pickles(self, load: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return load(*args, use_safetensors=self._use_safetensors, **kwargs)
        except OSError as exc:
            # A safetensors file that is there but does not read is another problem: say it as it is.
            if not self.safetensors_only or "safetensors" not in str(exc) or CORRUPT in str(exc):
                raise
            reason = " ".join(str(exc).split())[:300]
            raise ImagemillError(
                f"{self.setting} {self.source} has no safetensors weights ({reason}); {self.rule}: true "
                f"refuses pickled ones, which can run code when loaded: convert them to safetensors, or "
                f"set {self.rule}: false if you trust them"
            ) from None
