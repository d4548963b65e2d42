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

from imagemill.core.encode_rates import cores_to_encode, gpu_images_per_second, images_per_core_second
from imagemill.core.spec import JobSpec, PretrainedSection
from imagemill.workers.device_jpeg import DeviceJpeg


@dataclass(frozen=True)
class DeviceRule:
    """One setting that is slow or unsupported on some devices: `problems(spec, device)` gives the
    settings (dotted names) it applies to on `device`, and `fix` what to do about each."""

    problems: Callable[[JobSpec, str], list[str]]
    why: str  # what the setting does on that device; `{name}`s are filled from `figures`
    fix: str
    figures: Callable[[JobSpec, str], dict[str, object]] = lambda spec, device: {}

    def lines(self, spec: JobSpec, device: str) -> list[str]:
        problems = self.problems(spec, device)
        if not problems:
            return []
        figures = self.figures(spec, device)
        return [
            f"{setting}: {self.why.format(**figures)}; {self.fix.format(**figures)}" for setting in problems
        ]


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


def _device_rate(spec: JobSpec, device: str) -> float | None:
    """Images/s the actor's device makes: the emulated device's, or the slowest a GPU makes at the
    job's size and steps (core/encode_rates.py); None on a CPU, where encoding keeps up."""
    if spec.model.emulation is not None:
        return spec.model.emulation.images_per_second
    gen = spec.generation
    return gpu_images_per_second(gen.width, gen.height, gen.num_inference_steps) if device != "cpu" else None


def _encoding(spec: JobSpec, device: str) -> dict[str, object]:
    gen, image_format = spec.generation, spec.output.image_format
    rate = _device_rate(spec, device) or 0.0
    return {
        "format": image_format,
        "size": f"{gen.width}x{gen.height}",
        "rate": f"{rate:.3g}",
        "per_core": f"{images_per_core_second(image_format, gen.width, gen.height):.3g}",
        "cores": cores_to_encode(rate, image_format, gen.width, gen.height),
        "have": f"{spec.workers.num_cpus_per_worker:g}",
    }


def _encoding_outruns_cores(spec: JobSpec, device: str) -> list[str]:
    """The writer threads encode on the actor's CPUs (nvJPEG aside): fewer cores than the device's rate
    needs leave the device waiting on the writer queue (0.59 busy at 30 images/s of 512² PNG on 2
    cores, BENCHMARKS.md)."""
    rate = _device_rate(spec, device)
    if rate is None or DeviceJpeg.for_job(spec, device) is not None:
        return []
    gen = spec.generation
    encodes = spec.workers.num_cpus_per_worker * images_per_core_second(
        spec.output.image_format, gen.width, gen.height
    )
    return ["output.image_format"] if rate > encodes else []


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
    DeviceRule(
        _encoding_outruns_cores,
        "{format} at {size} encodes about {per_core} images/s per CPU core; this device makes about "
        "{rate}/s, which needs {cores} cores to encode, and the actor has {have}, so the device waits "
        "on the writers",
        "set workers.num_cpus_per_worker to {cores} (and give the nodes those cores), or use "
        "output.image_format: jpeg",
        _encoding,
    ),
)


def device_warnings(spec: JobSpec, device: str) -> list[str]:
    """One line per setting of `spec` known to be slow or unsupported on `device` (cpu, cuda, cuda:N)."""
    return [line for rule in RULES for line in rule.lines(spec, device)]
