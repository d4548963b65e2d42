"""The expander pool (`expansion.placement: pool`): prompt-expansion actors of their own.

The driver starts them before the ShardWorkers and hands each worker their handles; the workers send
them batches of prompts and get back expanded prompts, so no prompt text passes through the driver.
An expander holds no state between calls, so Ray restarts a dead one and retries its calls.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from imagemill.core.errors import ImagemillError
from imagemill.core.spec import JobSpec
from imagemill.workers.actors import PromptExpanderActor

RESTARTS = 3


def start_expanders(
    spec: JobSpec, name_prefix: str, describe_error: Callable[[BaseException], str]
) -> list[Any]:
    """Start `expansion.num_workers` expanders and wait until each has loaded its model.

    `describe_error` turns a Ray exception into one line. Returns [] unless the placement is `pool`.
    """
    expansion = spec.expansion
    if expansion is None or expansion.placement != "pool":
        return []
    device = "cuda" if expansion.num_gpus > 0 else "cpu"
    actor_class = ray.remote(
        num_cpus=expansion.num_cpus,
        num_gpus=expansion.num_gpus,
        max_restarts=RESTARTS,
        max_task_retries=RESTARTS,
    )(PromptExpanderActor)
    expanders = [
        actor_class.options(name=f"{name_prefix}:expander:{n + 1}").remote(expansion, device)
        for n in range(expansion.num_workers)
    ]
    try:
        ray.get([expander.ready.remote() for expander in expanders])
    except (RayActorError, RayTaskError) as exc:
        stop_expanders(expanders)
        raise ImagemillError(
            f"expanders could not load expansion model {expansion.source}: {describe_error(exc)}"
        ) from None
    return expanders


def stop_expanders(expanders: list[Any]) -> None:
    for expander in expanders:
        ray.kill(expander)
