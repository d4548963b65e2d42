"""The limits a spec value and a row's own value share: generation parameters, the watermark's payload.

Both sides import these (the spec when it loads, the actors per row: workers/rows.py,
workers/provenance), so a default every row would fail on is refused before anything runs.
"""

from __future__ import annotations

from typing import Any

# Limits of the generation parameters, for a job's defaults (GenerationSpec) and each row's own values
# (workers/rows.py) alike: a default every row would fail on is refused before anything runs.
MAX_SIDE = 4096  # larger images are refused instead of exhausting the accelerator's memory
MAX_STEPS = 1000
# diffusers takes any guidance and makes black images far past the useful range (7.5 for SD, 3.5 for
# FLUX's distilled guidance, 5 for Janus); 0 is what turbo models use (no classifier-free guidance).
MAX_GUIDANCE = 100
# What generation.select_by may name: a score the job computes for every image (scoring:'s CLIP score).
SELECTORS = ("clip_score",)


# The watermark's payload and the size it needs, for the spec and the actors (workers/provenance) alike.
MAX_WATERMARK_BITS = 64  # measured: 64 bits read back with at most 2 wrong from 256² images after JPEG q90
MIN_WATERMARK_PIXELS = 256 * 256  # invisible-watermark refuses smaller images
ALLOWED_BIT_ERRORS_PER = 16  # found: at most one wrong bit in 16 (workers/provenance/watermark.py)
# Each bit value must make up this share of a payload: the decoder reads constant bits from smooth images.
MIN_PAYLOAD_BIT_SHARE = 0.25


def payload_bits(payload: str) -> list[int]:
    """The bits of a payload: `0x` + hex digits, or text as UTF-8. ValueError when it is empty, is not
    hex after `0x`, is longer than MAX_WATERMARK_BITS, or is low-entropy (fewer than
    MIN_PAYLOAD_BIT_SHARE of its bits 0, or 1): verify would find it in never-watermarked images."""
    if payload[:2].lower() == "0x":
        try:
            data = bytes.fromhex(payload[2:])
        except ValueError:
            raise ValueError(f"{payload!r} starts with 0x but is not an even number of hex digits") from None
    else:
        data = payload.encode("utf-8")
    bits = [(byte >> (7 - i)) & 1 for byte in data for i in range(8)]
    if not bits or len(bits) > MAX_WATERMARK_BITS:
        raise ValueError(
            f"the payload must be 1 to {MAX_WATERMARK_BITS} bits (8 bytes of text, or 0x and 16 hex "
            f"digits), got {len(bits)}"
        )
    ones = sum(bits)
    if min(ones, len(bits) - ones) < len(bits) * MIN_PAYLOAD_BIT_SHARE:
        raise ValueError(
            f"{payload!r} is a low-entropy payload ({ones} of its {len(bits)} bits are 1): a smooth, "
            "never-watermarked image reads back near-constant bits and would match it; use one with at "
            f"least {MIN_PAYLOAD_BIT_SHARE:.0%} of its bits 0 and as many 1"
        )
    return bits


def watermark_size_problem(width: int, height: int) -> str | None:
    """Why a width x height image cannot carry the watermark, or None when it can."""
    if width * height < MIN_WATERMARK_PIXELS:
        return f"needs images of at least {MIN_WATERMARK_PIXELS} pixels (256x256), got {width}x{height}"
    return None


# Inpainting: the most pixels a mask may be grown or blurred by (a larger one repaints whole images).
MAX_MASK_RADIUS = 256

# Sources with more pixels are invalid_image rows (Pillow itself only warns from 89M, refuses from 179M).
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def generation_problem(name: str, value: Any) -> str | None:
    """Why `value` cannot be the generation parameter `name` ("<name> must be ..., got <value>"), or
    None when it can: the one rule for job defaults and per-row values."""
    if name == "num_inference_steps" and not (_is_int(value) and 0 < value <= MAX_STEPS):
        return f"num_inference_steps must be in 1..{MAX_STEPS}, got {value!r}"
    if name == "guidance_scale" and not (
        isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= MAX_GUIDANCE
    ):  # NaN fails the comparison too
        return f"guidance_scale must be a number in 0..{MAX_GUIDANCE}, got {value!r}"
    if name == "strength" and not (
        isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= 1
    ):
        return f"strength must be a number in (0, 1], got {value!r}"
    if name in ("width", "height") and not (_is_int(value) and 0 < value <= MAX_SIDE and value % 8 == 0):
        return f"{name} must be a multiple of 8 in 8..{MAX_SIDE}, got {value!r}"
    return None


def denoising_problem(num_inference_steps: Any, strength: Any) -> str | None:
    """Why an image-to-image row would run no denoising step, or None. SD-family pipelines run
    int(steps × strength) of the steps (and fail on none); one rule for every family keeps it simple."""
    if int(num_inference_steps * strength) < 1:
        return (
            f"strength {strength} x num_inference_steps {num_inference_steps} runs no denoising step; "
            "raise either so that their product is at least 1"
        )
    return None


def gang_size(gpus_per_worker: float, parallel: str) -> int:
    """Actors in one model replica: a replica of N GPUs whose model splits each image's work over them
    (`model.parallel: context`) is a gang of N, one per GPU, which meets before it loads the model
    (planning/placement.py places it, workers/worker.py loads after the meeting); anything else is one."""
    return int(gpus_per_worker) if gpus_per_worker > 1 and parallel == "context" else 1
