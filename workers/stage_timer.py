"""Seconds a shard spends in each stage, for its stats JSON, the job report and bench/throughput.py.

Stages, in the order of imagemill.core.stage_table (the one list of them): `read` (shard read and
validated), `text_encode`, `denoise` and `decode` (the model, split by timing the text encoders'
forward and the VAE's decode; denoise is the rest of each generate call), the post-generation stages
(the device ones timed by the selection, the writer ones such as `image_encode` on the writer
threads), `upload` (writer threads: summed thread time, so they may exceed the wall time), `host` (the model
turn's time in none of the device stages: the host work between the model's calls, which the device
waits for), and `idle`
(the model sat unused while this shard held or was next in line for it: waiting for this shard's
read, or for its writer threads to catch up).

On a device (CUDA, or the emulated accelerator) a stage is timed by two device events recorded on the
device's queue around it, so it is charged for the device's time between reaching its first kernel and
finishing its last, not for kernels queued before it, and timing adds no synchronize: the pairs are
resolved when the seconds are taken, after the batch's one unavoidable synchronize (its copy back).
Synchronizing around each stage instead cost 7 device syncs per batch (issue #27). On the CPU, with no
device queue, a stage is the host's `perf_counter` time. The worker takes a batch's seconds once its
copy back is done, while the next batch's events, recorded on the model thread, may not yet be
reached: `take` reads the reached pairs only, and leaves the others for a later take.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import torch

from imagemill.core.stage_table import STAGE_NAMES

STAGES = STAGE_NAMES


class DeviceEvent(Protocol):
    """What the timer needs of a device event: torch.cuda.Event's API, which the emulated
    accelerator's events (workers/generators/emulated.py) offer too."""

    def record(self) -> None: ...

    def query(self) -> bool: ...

    def synchronize(self) -> None: ...

    def elapsed_time(self, end_event: Any) -> float: ...


EventSource = Callable[[], DeviceEvent]


def device_events(device: str) -> EventSource | None:
    """New timing events on `device`'s current stream: CUDA's; None on the CPU (timed by the host clock)."""
    if device.startswith("cuda"):
        return functools.partial(torch.cuda.Event, enable_timing=True)
    return None


class StageTimer:
    """Seconds per stage, added to from any thread; timed with `events` (device_events) where given."""

    def __init__(self, events: EventSource | None = None):
        self.events = events
        self._seconds: dict[str, float] = {}
        self._unresolved: list[tuple[str, DeviceEvent, DeviceEvent]] = []  # device stages not yet read
        self._lock = threading.Lock()

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self._seconds[stage] = self._seconds.get(stage, 0.0) + seconds

    @contextmanager
    def timing(self, stage: str) -> Iterator[None]:
        """Charge the time spent in the `with` block to `stage`: on a device, the device's time between
        the events recorded at its start and end (read later, never waited for here)."""
        if self.events is None:
            started = time.perf_counter()
            try:
                yield
            finally:
                self.add(stage, time.perf_counter() - started)
            return
        start = self.events()
        start.record()
        try:
            yield
        finally:
            end = self.events()
            end.record()
            with self._lock:
                self._unresolved.append((stage, start, end))

    def _resolve(self, reached_only: bool = False) -> None:
        """Turn the recorded event pairs into seconds; called under the lock. Waits for each end event
        alone, never for the whole device (none where the caller has synchronized past it, the batch's
        copy back); `reached_only` leaves the pairs not yet reached for later instead."""
        waiting = []
        for stage, start, end in self._unresolved:
            if reached_only and not end.query():
                waiting.append((stage, start, end))
                continue
            end.synchronize()
            self._seconds[stage] = self._seconds.get(stage, 0.0) + start.elapsed_time(end) / 1000
        self._unresolved = waiting

    def total(self, stages: tuple[str, ...]) -> float:
        """The seconds charged so far to `stages`, together."""
        with self._lock:
            self._resolve()
            return sum(self._seconds.get(stage, 0.0) for stage in stages)

    def take(self, reached_only: bool = False) -> dict[str, float]:
        """The seconds added since the last `take`, and start again from zero; `reached_only`: of the
        device stages, those the device has finished (the rest are taken later), without waiting."""
        with self._lock:
            self._resolve(reached_only)
            seconds, self._seconds = self._seconds, {}
        return seconds

    def summary(self) -> dict[str, float]:
        """Every stage in STAGES (zero where nothing was added), then any other stage charged (a
        registered stage's), in milliseconds' precision."""
        with self._lock:
            self._resolve()
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
