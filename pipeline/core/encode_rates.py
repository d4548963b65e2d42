"""How fast one CPU core encodes images, and how fast a device makes them: the cores a worker needs so
that its writer threads keep up with its device (issue #27).

The per-core rates are BENCHMARKS.md's writer-path table (bench/writers.py, 2026-11-30: images per
CPU-second through the worker's writers to a local folder, imagemill's defaults), at 512² and 1024²;
encoding costs about the same per pixel at both, so other sizes scale by pixels from the nearer one.
A device's rate is the emulation's where the model is emulated; for a real model it is the slowest rate
the device-busy issue lists for a GPU: an SD-1.5-class model at 512², 20 steps, 7 images/s, scaled by
pixels and steps (1024² at 20 steps: 1.75; 4 steps at 512²: 35, as few-step models make 30-60).
Used by the start-up warning (workers/device_warnings.py) and bench/device_busy.py's table.
"""

from __future__ import annotations

import math

# images per CPU-second on one core, by (side of a square image, format)
PER_CORE = {
    (512, "png"): 7.4,
    (512, "jpeg"): 155.7,
    (512, "webp"): 29.6,
    (1024, "png"): 1.7,
    (1024, "jpeg"): 94.0,
    (1024, "webp"): 10.0,
}
GPU_IMAGES_PER_SECOND = 7.0  # the slowest GPU rate the issue lists: at GPU_PIXELS, GPU_STEPS steps
GPU_PIXELS = 512 * 512
GPU_STEPS = 20


def images_per_core_second(image_format: str, width: int, height: int) -> float:
    """One core's encoding rate for images of this size, scaled by pixels from the nearer measured size."""
    pixels = width * height
    side = min((512, 1024), key=lambda measured: abs(math.log(pixels / measured**2)))
    return PER_CORE[side, image_format] * side**2 / pixels


def gpu_images_per_second(width: int, height: int, steps: int) -> float:
    """The slowest rate a GPU makes images of this size in `steps` denoising steps."""
    return GPU_IMAGES_PER_SECOND * GPU_PIXELS / (width * height) * GPU_STEPS / max(steps, 1)


def cores_to_encode(images_per_second: float, image_format: str, width: int, height: int) -> int:
    """The whole cores that encode `images_per_second` images of this format and size."""
    return max(1, math.ceil(images_per_second / images_per_core_second(image_format, width, height)))
