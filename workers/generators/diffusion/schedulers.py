"""`model.scheduler`: the sampler a diffusers pipeline denoises with, swapped after loading.

Step-distilled models (LCM, Turbo, Lightning) are meant to run with their own scheduler, and a
sampler such as DPM-Solver++ with Karras sigmas reaches a given quality in fewer steps. The new
scheduler is built as diffusers documents it, `Class.from_config(pipe.scheduler.config, **overrides)`,
so it keeps the model's own training settings (betas, prediction type) and changes only what the
overrides name.

Which names and settings a spec may give is `imagemill.core.schedulers`' rule, checked by the driver
before the job starts and again here, by the worker that loads the model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from imagemill.core.schedulers import scheduler_class, scheduler_problem


def describe(pipe: Any, config: Mapping[str, Any]) -> str:
    """The scheduler as the metadata records it: its class, and the overrides given, as JSON values."""
    name = type(pipe.scheduler).__name__
    if not config:
        return name
    settings = ", ".join(f"{key}={json.dumps(config[key])}" for key in sorted(config))
    return f"{name}({settings})"


def swap_scheduler(pipe: Any, name: str, config: Mapping[str, Any]) -> None:
    """Replace the pipeline's scheduler by `name` built from the pipeline's own scheduler config with
    `config` over it (checked by scheduler_problem when the spec was read)."""
    problem = scheduler_problem(name, config)
    if problem:
        raise ValueError(f"model.scheduler: {problem}")
    pipe.scheduler = scheduler_class(name).from_config(pipe.scheduler.config, **config)
