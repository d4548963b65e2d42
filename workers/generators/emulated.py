"""An emulated accelerator: the two halves of a GPU, on a CPU, so that device busy share can be measured
on machines without one (issue #27; bench/device_busy.py).

A GPU's denoising loop is Python that launches kernels: per step, the launching thread does a fixed
amount of Python work while holding the GIL, and the device runs the step's kernels asynchronously,
without the GIL, in launch order. The device idles whenever the launching thread falls behind, for
example because the actor's writer and reader threads hold the GIL. This generator does the same:

- the calling thread does `launch_ms_per_step` of pure-Python work per denoising step (a count of
  loop iterations calibrated at load, so that it takes longer, not less, when other threads want the
  GIL), and queues the step's device time;
- one device thread per generator runs the queue in order, sleeping for each step's time (sleep
  releases the GIL), and counts the seconds it was busy;
- the batch's images (textured: smooth colour, hard edges and grain, so that encoding costs what it
  costs for generated images; chosen by seed) are made by the device thread within the last step's
  time, as a GPU's decode writes its output tensor on the device: stacking 16 512² images on the
  launching thread left the device idle for it every batch (3-6% of its time at 30 images/s, issue #27);
- `generate` returns the batch's images as soon as its steps are queued, as a CUDA generator returns a
  tensor its kernels have yet to write: the tensor is in host memory, written by the device thread,
  and read only after an event recorded behind the batch is reached (the worker's copy back,
  workers/device_jpeg.py; the selection waits for it before a stage computes on the pixels).

The device time per image is 1 / `model.emulation.images_per_second`, split evenly over the steps.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable
from functools import cache

import numpy as np
import torch

from imagemill.core.spec import JobSpec
from imagemill.workers.generators.contract import BatchKey
from imagemill.workers.stage_timer import StageTimer

TEXTURES = 8  # distinct images per size, handed out by seed
CALIBRATION_SECONDS = 0.05


def _python_work(iterations: int) -> int:
    """Pure-Python work that holds the GIL (the interpreter may hand it over between bytecodes, as it
    does between the calls that launch kernels)."""
    total = 0
    for i in range(iterations):
        total += i
    return total


def _iterations_per_second() -> float:
    """How many `_python_work` iterations this interpreter runs per second on an uncontended GIL."""
    done, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < CALIBRATION_SECONDS:
        _python_work(10_000)
        done += 10_000
    return done / elapsed


@cache
def textured(height: int, width: int, seed: int) -> np.ndarray:
    """A (height, width, 3) uint8 image with what generated images have: smooth colour, edges, grain."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    channels = [
        sum(
            np.sin(2 * math.pi * (rng.uniform(0.5, 4) * x + rng.uniform(0.5, 4) * y) + rng.uniform(0, 6))
            for _ in range(4)
        )
        for _ in range(3)
    ]
    image = np.stack(channels, -1) * 30 + 128
    cx, cy, r = rng.uniform(0.2, 0.8, 3) * (1, 1, 0.4)
    image[(x - cx) ** 2 + (y - cy) ** 2 < r**2] += rng.uniform(-60, 60, 3)  # a shape with hard edges
    image += rng.normal(0, 2, image.shape)  # grain
    return image.clip(0, 255).astype(np.uint8)


class EmulatedEvent:
    """A timing event on the emulated device, with torch.cuda.Event's API: `record` queues it in the
    device's order, and the device thread stamps it with the device's clock when it reaches it (when
    the work queued before it has ended, or at once on an idle device), taking no device time."""

    def __init__(self, device: EmulatedDevice) -> None:
        self._device = device
        self._reached = threading.Event()
        self.stamp = 0.0  # the device's clock (perf_counter seconds) when the queue reached the event

    def record(self) -> None:
        self._device.launch(0.0, self)

    def query(self) -> bool:
        return self._reached.is_set()

    def synchronize(self) -> None:
        """Wait for this event alone to be reached (cudaEventSynchronize), not for the whole queue."""
        self._reached.wait()

    def elapsed_time(self, end_event: EmulatedEvent) -> float:
        """Milliseconds on the device's clock from this event to `end_event`, both reached."""
        assert self.query() and end_event.query(), "both events must be reached before timing them"
        return (end_event.stamp - self.stamp) * 1000

    def _reach(self, at: float) -> None:
        self.stamp = at
        self._reached.set()


# what a queue entry does when the device reaches it: write output, stamp an event, or nothing
Work = Callable[[], None] | EmulatedEvent | None


class EmulatedDevice:
    """One in-order device queue run by its own thread; `busy_seconds` is the time it spent running.

    The device keeps its own clock, as a GPU runs whatever the CPU's scheduler does: a step starts when
    the previous one ends or when it was launched, whichever is later, and ends its time after that,
    so a device thread woken late by a loaded CPU does not stretch the device's time (on 2 cores at
    load 7 the late wake-ups added 15% to it); the caller's `synchronize` still waits for the thread.
    A step lasts its time, or its work's own time where that is longer; the time the thread waited
    for a core or the GIL is never added (it was, whenever the thread fell more than a step behind:
    0.66 s of 6.2 at 60 images/s, load 3.7, issue #27)."""

    def __init__(self, depth: int) -> None:
        self._queue: queue.Queue[tuple[float, float, Work]] = queue.Queue(maxsize=depth)
        self.busy_seconds = 0.0
        self._free_at = 0.0  # perf_counter() when the last step queued ends on the device's clock
        threading.Thread(target=self._run, name="emulated-device", daemon=True).start()

    def launch(self, seconds: float, work: Work = None) -> None:
        """Queue `seconds` of device work, during which the device thread runs `work` (what the kernels
        write); blocks only when the queue is full, as a launch does."""
        self._queue.put((time.perf_counter(), seconds, work))

    def synchronize(self) -> None:
        self._queue.join()

    def event(self) -> EmulatedEvent:
        """A new timing event on this device (record it to queue it): the stage timer's event source."""
        return EmulatedEvent(self)

    def _run(self) -> None:
        while True:
            launched, seconds, work = self._queue.get()
            start = max(self._free_at, launched)
            if isinstance(work, EmulatedEvent):  # reached: stamped on the device's clock, no device time
                self._free_at = start
                work._reach(start)
                self._queue.task_done()
                continue
            working = time.perf_counter()
            if work is not None:
                work()
            # the step takes its time, or its work's if that is longer (which shows as idle); never the
            # time the thread was kept from running, which a GPU does not lose
            self._free_at = start + max(seconds, time.perf_counter() - working)
            if (left := self._free_at - time.perf_counter()) > 0:  # a late thread catches up
                time.sleep(left)
            self.busy_seconds += seconds
            self._queue.task_done()


class EmulatedGenerator:
    scheduler_name = a1111_sampler = None  # no diffusers scheduler to name
    token_slices = 1  # one process draws each image

    def __init__(self, images_per_second: float, launch_seconds_per_step: float, queue_depth: int) -> None:
        self.seconds_per_image = 1.0 / images_per_second
        self.launch_iterations = round(launch_seconds_per_step * _iterations_per_second())
        self.device = EmulatedDevice(queue_depth)
        # charged nothing (the model's time is all `denoise`); its events, the device's, time the
        # selection's device stages as CUDA events time them on a GPU
        self.stage_timer = StageTimer(self.device.event)

    @classmethod
    def from_spec(cls, spec: JobSpec, device: str) -> EmulatedGenerator:
        emulation = spec.model.emulation
        for seed in range(TEXTURES):  # drawn at load, as weights load: not charged to the first batch
            textured(spec.generation.height, spec.generation.width, seed)
        return cls(emulation.images_per_second, emulation.launch_ms_per_step / 1000, emulation.queue_depth)

    def truncated(self, prompts: list[str]) -> list[bool]:
        return [False] * len(prompts)

    def generate(
        self, prompts: list[str], negative_prompts: list[str | None], seeds: list[int], key: BatchKey
    ) -> torch.Tensor:
        """The batch's images, written by the device thread in the last step's time: valid once an
        event recorded after this call is reached (`self.device.event()`), as on a GPU."""
        steps = max(key.num_inference_steps, 1)
        step_seconds = len(seeds) * self.seconds_per_image / steps
        images = torch.empty((len(seeds), key.height, key.width, 3), dtype=torch.uint8)

        def decode() -> None:  # the last step's kernels write the batch's images
            np.stack([textured(key.height, key.width, s % TEXTURES) for s in seeds], out=images.numpy())

        for step in range(steps):
            _python_work(self.launch_iterations)
            self.device.launch(step_seconds, decode if step == steps - 1 else None)
        return images
