"""Where a shard's expansion batches run: the `submit`/`wait` pair `ShardExpansion` calls, per placement.

`ShardExpansion` submits a few batches ahead and waits for each when the generator needs it. On the
actor (`expansion.placement: actor`) nothing can run ahead: the language model shares the device
and runs inside this call's model turn, so `submit` only notes the batch and `wait` runs it. On the
pool, `submit` sends the batch to an expander actor and `wait` fetches its prompts.
"""

from __future__ import annotations

import itertools
import random
from typing import TYPE_CHECKING, Any

from imagemill.workers.stages.expansion import PromptExpander

if TYPE_CHECKING:  # Ray is imported where the pool is used: a worker without a pool runs without Ray
    import ray

Batch = tuple[list[str], list[int]]  # prompts and their expansion seeds


class OnActor:
    """Expansion by the worker's own `PromptExpander`, run when the generator waits for a batch."""

    def __init__(self, expander: PromptExpander):
        self.expander = expander

    def submit(self, prompts: list[str], seeds: list[int]) -> Batch:
        return prompts, seeds

    def wait(self, batch: Batch) -> list[str]:
        return self.expander.expand(*batch)


class OnPool:
    """Expansion by the expander actors, one batch each in turn, from a random first one so that the
    workers spread over the pool."""

    def __init__(self, expanders: list[Any]):
        self.expanders = expanders
        self.turn = itertools.count(random.randrange(len(expanders)))

    def submit(self, prompts: list[str], seeds: list[int]) -> ray.ObjectRef:
        return self.expanders[next(self.turn) % len(self.expanders)].expand.remote(prompts, seeds)

    @staticmethod
    def wait(handle: ray.ObjectRef) -> list[str]:
        import ray

        try:
            return ray.get(handle)
        except ray.exceptions.RayActorError as exc:  # else the driver would take this worker for dead
            raise RuntimeError(f"an expander died and could not be restarted: {exc}") from None
