"""Sampler names: which diffusers scheduler classes a spec may name (`model.scheduler`) and with which
settings, and what A1111 calls the sampler a scheduler is.

Shared by the driver (refused before the job starts, beside the model check) and the actor that swaps
the scheduler in (workers/generators/diffusion/schedulers.py). Only `diffusers.schedulers` is looked in,
so no spec can make a process import a module of its choosing; diffusers is imported on first use, so
the driver pays for it only for a job that sets a scheduler. `a1111_sampler` needs no diffusers: the
actor names its loaded scheduler with it for the files' A1111 `parameters` text.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from imagemill.core.errors import ImagemillError
from imagemill.core.spec import SchedulerSpec


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


# A1111's names for the samplers diffusers implements (diffusers' "A1111/k-diffusion ↔ diffusers"
# table), by scheduler class; DPMSolverMultistepScheduler's depend on its algorithm and order.
_A1111_NAMES = {
    "DDIMScheduler": "DDIM",
    "PNDMScheduler": "PLMS",
    "EulerDiscreteScheduler": "Euler",
    "FlowMatchEulerDiscreteScheduler": "Euler",  # as Forge names it for flow-matching models
    "EulerAncestralDiscreteScheduler": "Euler a",
    "HeunDiscreteScheduler": "Heun",
    "LMSDiscreteScheduler": "LMS",
    "KDPM2DiscreteScheduler": "DPM2",
    "KDPM2AncestralDiscreteScheduler": "DPM2 a",
    "DPMSolverSDEScheduler": "DPM++ SDE",
    "DPMSolverSinglestepScheduler": "DPM++ SDE",
    "UniPCMultistepScheduler": "UniPC",
    "LCMScheduler": "LCM",
}
_DPM_MULTISTEP = {
    ("dpmsolver++", 2): "DPM++ 2M",
    ("sde-dpmsolver++", 2): "DPM++ 2M SDE",
    ("sde-dpmsolver++", 3): "DPM++ 3M SDE",
}


def a1111_sampler(class_name: str, config: Mapping[str, Any]) -> str | None:
    """A1111's name for scheduler `class_name` with `config` (the scheduler's own config, so Karras
    sigmas set by the model's files count too): "DPM++ 2M Karras", "Euler a", "DDIM", ...; None for a
    scheduler A1111 has no name for (the files then show the diffusers class)."""
    if class_name == "DPMSolverMultistepScheduler":
        algorithm = (config.get("algorithm_type", "dpmsolver++"), config.get("solver_order", 2))
        name = _DPM_MULTISTEP.get(algorithm)
    else:
        name = _A1111_NAMES.get(class_name)
    return f"{name} Karras" if name and config.get("use_karras_sigmas") else name
