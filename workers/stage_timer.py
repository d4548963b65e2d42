"""Seconds a shard spends in each stage, for its stats JSON, the job report and bench/throughput.py.

Stages, in the order of imagemill.core.stage_table (the one list of them): `read` (shard read and
validated), `text_encode`, `denoise` and `decode` (the model, split by timing the text encoders'
forward and the VAE's decode; denoise is the rest of each generate call), the post-generation stages
(the device ones timed by the selection, the writer ones such as `image_encode` on the writer
threads), `upload` (writer threads: summed thread time, so they may exceed the wall time), `host` (the model
turn's time in none of the device stages: the host work between the model's calls, which the device
waits for), and `idle`
(the model sat unused while this shard held or was next in line for it: waiting for this shard's
read, or for its writer threads to catch up). On CUDA the clock is read after a synchronize, so a
stage is not charged for kernels queued before it.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from imagemill.core.stage_table import STAGE_NAMES

STAGES = STAGE_NAMES


class StageTimer:
    """Seconds per stage, added to from any thread."""

    def __init__(self, device: str = "cpu"):
        self._seconds: dict[str, float] = {}
        self._lock = threading.Lock()
        self._synchronize = torch.cuda.synchronize if device.startswith("cuda") else None

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self._seconds[stage] = self._seconds.get(stage, 0.0) + seconds

    @contextmanager
    def timing(self, stage: str) -> Iterator[None]:
        """Charge the time spent in the `with` block to `stage`."""
        if self._synchronize:
            self._synchronize()
        started = time.perf_counter()
        try:
            yield
        finally:
            if self._synchronize:
                self._synchronize()
            self.add(stage, time.perf_counter() - started)

    def total(self, stages: tuple[str, ...]) -> float:
        """The seconds charged so far to `stages`, together."""
        with self._lock:
            return sum(self._seconds.get(stage, 0.0) for stage in stages)

    def take(self) -> dict[str, float]:
        """The seconds added since the last `take`, and start again from zero."""
        with self._lock:
            seconds, self._seconds = self._seconds, {}
        return seconds

    def summary(self) -> dict[str, float]:
        """Every stage in STAGES (zero where nothing was added), then any other stage charged (a
        registered stage's), in milliseconds' precision."""
        with self._lock:
            stages = [*STAGES, *(stage for stage in self._seconds if stage not in STAGES)]
            return {stage: round(self._seconds.get(stage, 0.0), 3) for stage in stages}


def timed(function: Callable[..., Any], timer: StageTimer, stage: str) -> Callable[..., Any]:
    """`function`, charging each call's time to `stage`."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with timer.timing(stage):
            return function(*args, **kwargs)

    return wrapper


def time_pipeline_stages(pipe: Any, timer: StageTimer) -> None:
    """Charge a diffusers pipeline's text encoders (any number: SD has one, SDXL two, SD3 three) to
    `text_encode` and its VAE decode to `decode`. Done by wrapping the instances' methods, so it
    works for any pipeline class that has these components; call it after the VAE is final."""
    for name, component in pipe.components.items():
        if name.startswith("text_encoder") and isinstance(component, torch.nn.Module):
            component.forward = timed(component.forward, timer, "text_encode")
    vae = getattr(pipe, "vae", None)
    if vae is not None:
        vae.decode = timed(vae.decode, timer, "decode")
