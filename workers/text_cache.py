"""An actor-wide cache of text embeddings: each distinct text is encoded once while it stays cached.

Prompts repeat within and across shards (images_per_prompt, nightly prompt sets), so both the
generator's text encoder and the CLIP scorer's keep what they encoded, least recently used out.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch

EMBEDDING_CACHE_SIZE = 512  # distinct texts an actor keeps per cache

Embeddings = dict[str, torch.Tensor]  # name (e.g. a pipeline's __call__ argument) → one row per text


class TextEmbeddingCache:
    def __init__(self, encode: Callable[[list], Embeddings], size: int = EMBEDDING_CACHE_SIZE):
        """`encode` turns a list of distinct keys (texts, or tuples naming a text) into named
        embeddings with one row per key along dim 0."""
        self.encode = encode
        self.size = size
        self.entries: OrderedDict[Hashable, Embeddings] = OrderedDict()

    def __call__(self, keys: list) -> Embeddings:
        """The embeddings of `keys`, stacked in order; only keys not cached are encoded."""
        missing = [key for key in dict.fromkeys(keys) if key not in self.entries]
        if missing:
            encoded = self.encode(missing)
            for row, key in enumerate(missing):
                self.entries[key] = {name: rows[row] for name, rows in encoded.items()}
        batch = {
            name: torch.stack([self.entries[key][name] for key in keys]) for name in self.entries[keys[0]]
        }
        for key in keys:
            self.entries.move_to_end(key)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return batch
