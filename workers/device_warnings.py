"""Settings known to be slow or unsupported on the device an actor got: the one table of them.

A spec is written before anyone knows which device each actor gets (`model.device: auto`), so a setting
that is fine on a GPU can make a CPU worker crawl, silently: `dtype: float16` ran 2.5x slower than
float32 on CPU (issue #24 item 8). Each rule here is one warning line naming the setting and the fix;
the actor returns its lines from `ready()` and the driver shows each distinct line once
(imagemill.execution.scheduler), so two actors on CPU print it once.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

from imagemill.core.spec import JobSpec, PretrainedSection


@dataclass(frozen=True)
class DeviceRule:
    """One setting that is slow or unsupported on some devices: `problems(spec, device)` gives the
    settings (dotted names) it applies to on `device`, and `fix` what to do about each."""

    problems: Callable[[JobSpec, str], list[str]]
    why: str  # what the setting does on that device
    fix: str

    def lines(self, spec: JobSpec, device: str) -> list[str]:
        return [f"{setting}: {self.why}; {self.fix}" for setting in self.problems(spec, device)]


def _on_actor(spec: JobSpec) -> dict[str, PretrainedSection]:
    """The sections whose weights load on the actor's own device, by name (a prompt expander of
    `placement: pool` runs on actors of its own)."""
    sections = {name: getattr(spec, name) for name in ("model", "scoring", "safety", "evaluation")}
    if spec.expansion is not None and spec.expansion.placement == "actor":
        sections["expansion"] = spec.expansion
    return {name: section for name, section in sections.items() if isinstance(section, PretrainedSection)}


def _float16_on_cpu(spec: JobSpec, device: str) -> list[str]:
    if device != "cpu":
        return []
    return [f"{name}.dtype" for name, section in _on_actor(spec).items() if section.dtype == "float16"]


def _compile_on_cpu(spec: JobSpec, device: str) -> list[str]:
    return ["speed.compile"] if device == "cpu" and spec.speed.compile else []


def _jpeg_on_cuda_without_nvjpeg(spec: JobSpec, device: str) -> list[str]:
    """JPEG on CUDA is encoded on the GPU (workers/device_jpeg.py) only where torchvision is installed."""
    wanted = spec.output.image_format == "jpeg" and device.startswith("cuda")
    return ["output.image_format"] if wanted and importlib.util.find_spec("torchvision") is None else []


def _offload_on_cpu(spec: JobSpec, device: str) -> list[str]:
    return ["model.offload"] if device == "cpu" and spec.model.offload != "none" else []


def _parallel_on_cpu(spec: JobSpec, device: str) -> list[str]:
    return ["model.parallel"] if device == "cpu" and spec.model.parallel != "none" else []


RULES = (
    DeviceRule(
        _float16_on_cpu,
        "float16 on CPU runs about 2.5x slower than float32 (no fast half-precision CPU kernels)",
        "set it to float32 for CPU workers",
    ),
    DeviceRule(
        _compile_on_cpu,
        "torch.compile on CPU compiles for minutes at each worker's start and gains little there",
        "set speed.compile: false for CPU workers",
    ),
    DeviceRule(
        _jpeg_on_cuda_without_nvjpeg,
        "jpeg on CUDA is encoded on the CPU here, as torchvision (nvJPEG) is not installed",
        "pip install 'imagemill[gpu-jpeg]' on the GPU nodes",
    ),
    DeviceRule(  # workers/generators/diffusion/layout.py: not applied there
        _offload_on_cpu,
        "a CPU worker's weights already are in host memory, so offloading does nothing there",
        "set model.offload: none for CPU workers",
    ),
    DeviceRule(
        _parallel_on_cpu,
        "it spreads the model over a replica's GPUs; a CPU worker's processes share one memory and its "
        "cores, so it gains nothing there",
        "set model.parallel: none for CPU workers",
    ),
)


def device_warnings(spec: JobSpec, device: str) -> list[str]:
    """One line per setting of `spec` known to be slow or unsupported on `device` (cpu, cuda, cuda:N)."""
    return [line for rule in RULES for line in rule.lines(spec, device)]
