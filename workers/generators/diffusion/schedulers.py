"""`model.scheduler`: the sampler a diffusers pipeline denoises with, swapped after loading.

Step-distilled models (LCM, Turbo, Lightning) are meant to run with their own scheduler, and a
sampler such as DPM-Solver++ with Karras sigmas reaches a given quality in fewer steps. The new
scheduler is built as diffusers documents it, `Class.from_config(pipe.scheduler.config, **overrides)`,
so it keeps the model's own training settings (betas, prediction type) and changes only what the
overrides name.

A spec names the class by its name, never by a dotted path: only classes diffusers exports that are
schedulers (`SchedulerMixin` subclasses) are taken, so no spec can make a worker import a module of
its choosing. Override keys the class's constructor does not take would be dropped by diffusers with
a log line; they are refused instead, in one line, by the driver before the job starts
(`check_scheduler`, beside its model check), and again by the worker that loads the model.
diffusers is imported on first use: the driver pays for it only for a job that sets a scheduler.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from typing import Any

from imagemill.errors import ImagemillError
from imagemill.spec import SchedulerSpec


def scheduler_class(name: str) -> type | None:
    """The diffusers scheduler class called `name`, or None when diffusers exports no such scheduler.
    Only `diffusers.schedulers` is looked in, so no other module is imported for a name."""
    from diffusers import SchedulerMixin, schedulers

    if name not in _scheduler_names():
        return None
    try:
        found = getattr(schedulers, name)
    except Exception:  # a lazily imported class whose backend is missing
        return None
    return found if isinstance(found, type) and issubclass(found, SchedulerMixin) else None


def _scheduler_names() -> list[str]:
    """The scheduler classes diffusers exports for PyTorch (not Flax's), by name."""
    from diffusers import schedulers

    return sorted(n for n in dir(schedulers) if n.endswith("Scheduler") and not n.startswith("Flax"))


def scheduler_problem(name: str, config: Mapping[str, Any]) -> str | None:
    """Why `name` with these overrides cannot be the pipeline's scheduler, in one line; None if it can."""
    cls = scheduler_class(name)
    if cls is None:
        return f"'{name}' is not a diffusers scheduler class; use one of: {', '.join(_scheduler_names())}"
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(config) - set(accepted))
    if unknown:
        return f"{name} takes no {', '.join(unknown)}; its settings are: {', '.join(accepted)}"
    return None


def check_scheduler(spec: SchedulerSpec | None) -> None:
    """The driver's check of `model.scheduler`: one line naming the setting when it cannot be used."""
    problem = scheduler_problem(spec.name, spec.config) if spec is not None else None
    if problem:
        raise ImagemillError(f"model.scheduler: {problem}")


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
