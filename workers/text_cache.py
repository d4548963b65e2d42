"""An actor-wide cache of text embeddings: each distinct text is encoded once while it stays cached.

Prompts repeat within and across shards (images_per_prompt, nightly prompt sets), so both the
generator's text encoder and the consistency scorer's keep what they encoded, least recently used out.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

EMBEDDING_CACHE_SIZE = 512  # distinct texts an actor keeps per cache


class TextEmbeddingCache:
    def __init__(self, encode: Callable[[list[str]], torch.Tensor], size: int = EMBEDDING_CACHE_SIZE):
        """`encode` turns a list of texts into a tensor with one embedding per text along dim 0."""
        self.encode = encode
        self.size = size
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """The embeddings of `texts`, stacked in order; only texts not cached are encoded."""
        missing = [text for text in dict.fromkeys(texts) if text not in self.entries]
        if missing:
            self.entries.update(zip(missing, self.encode(missing), strict=True))
        batch = torch.stack([self.entries[text] for text in texts])
        for text in texts:
            self.entries.move_to_end(text)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return batch
