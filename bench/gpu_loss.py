"""Each candidate for the device time the worker loses against the bare loop, measured (issue #27 item 2):

    python bench/gpu_loss.py            # the tiny model on this machine; writes BENCHMARKS.md's section
    python bench/gpu_loss.py --no-write # print it only

What a CPU can count, it counts; what only a GPU shows (time lost to a synchronize, the CUDA caching
allocator) bench/gpu.sh measures with bench/worker_loop.py. Candidates:

- host ops per denoising step: torch ops recorded by the profiler for one batch at 2 and at 6 steps, bare
  pipeline call vs the worker's generator; their difference ÷ 4 is the per-step count, the rest is per
  batch (per-row generators and latents, text embeddings, scheduler set-up, post-processing);
- classifier-free guidance: denoiser calls per step and their batch size, bare vs worker (split or fused);
- stage_timer synchronising the device: device synchronizes per batch of one shard through the in-process
  worker on the tiny model, its stage timers on the emulated accelerator, timed by device events (now) vs
  synchronizing around each section (before, replayed); and a whole emulated shard's;
- the device waiting at each batch boundary: an emulated shard's device busy share with the model thread
  waiting for each batch's copy back before launching the next (before, replayed) vs launching it
  first (now), side by side;
- GIL contention: the emulated accelerator (2 ms of GIL-held launch work per step, 512² at 30 images/s,
  batch 16), each batch's images encoded by 4 writer threads while the next batch generates (as the
  worker hands them over) vs not encoded: the device's busy share;
- allocation churn between batch shapes: generate time at one shape after another shape vs after the same
  shape (CPU; the CUDA caching allocator's cost is for bench/gpu.sh).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import torch
from throughput import _machine, publish

SIZE, BATCH, GUIDANCE = 64, 4, 5.0


def _pipe(model: Path):  # the bare loop's pipeline, as bench/throughput.py builds it
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _bare(pipe, steps: int) -> None:
    pipe(
        prompt=[f"a red circle {i}" for i in range(BATCH)],
        num_inference_steps=steps,
        guidance_scale=GUIDANCE,
        width=SIZE,
        height=SIZE,
        generator=[torch.Generator("cpu").manual_seed(i) for i in range(BATCH)],
        output_type="pt",
    )


def _worker_generate(generator, steps: int) -> None:
    from imagemill.workers.generators.contract import BatchKey

    prompts = [f"a red circle {i}" for i in range(BATCH)]
    generator.generate(prompts, [None] * BATCH, list(range(BATCH)), BatchKey(SIZE, SIZE, steps, GUIDANCE))


def _ops(call) -> int:
    """torch ops the profiler records for one call (after a warm-up call)."""
    call()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        call()
    return sum(event.count for event in profile.key_averages())


def _denoiser_calls(denoiser, call) -> list[int]:
    """The batch size of each denoiser forward during one call."""
    sizes: list[int] = []
    handle = denoiser.register_forward_pre_hook(
        lambda module, args, kwargs: sizes.append((args[0] if args else kwargs["sample"]).shape[0]),
        with_kwargs=True,
    )
    try:
        call()
    finally:
        handle.remove()
    return sizes


def host_ops(model: Path) -> list[tuple[str, str, str, str]]:
    import imagemill
    from imagemill.workers.worker import make_generator

    pipe = _pipe(model)
    spec = imagemill.build_spec(
        {
            "input": {"path": "/in"},
            "output": {"path": "/out"},
            "model": {"source": str(model), "device": "cpu"},
            "generation": {"width": SIZE, "height": SIZE, "guidance_scale": GUIDANCE},
        }
    )
    generator = make_generator(spec, "cpu")
    counts = {}
    for name, run in (("bare", partial(_bare, pipe)), ("worker", partial(_worker_generate, generator))):
        low, high = _ops(partial(run, 1)), _ops(partial(run, 3))
        counts[name] = ((high - low) / 2, low - (high - low) / 2)
    (bare_step, bare_batch), (worker_step, worker_batch) = counts["bare"], counts["worker"]
    bare_calls = _denoiser_calls(pipe.unet, lambda: _bare(pipe, 3))
    worker_calls = _denoiser_calls(generator.pipe.unet, lambda: _worker_generate(generator, 3))
    command = "python bench/gpu_loss.py"
    verdict_step = "ruled out: the same per step" if worker_step <= bare_step * 1.02 else "confirmed"
    return [
        (
            "per-step host work in the generate loop",
            f"torch ops per step, profiler, tiny model, batch {BATCH}, 1 vs 3 steps (`{command}`)",
            f"bare {bare_step:.0f}, worker {worker_step:.0f} per step",
            verdict_step,
        ),
        (
            "per-batch host work (per-row generators and latents, embeddings, scheduler objects)",
            f"torch ops per batch outside the steps, as above (`{command}`)",
            f"bare {bare_batch:.0f}, worker {worker_batch:.0f} per batch",
            "per batch, not per step: "
            + ("ruled out" if worker_batch <= bare_batch * 1.1 else "more than bare, once per batch"),
        ),
        (
            "CFG batches split where the bare loop fuses them",
            f"denoiser forward calls and their batch sizes, 3 steps (`{command}`)",
            f"bare {bare_calls}, worker {worker_calls}",
            "ruled out: fused (one call of 2×batch per step)"
            if worker_calls == bare_calls
            else "confirmed: the calls differ",
        ),
    ]


def timer_syncs(model: Path, scratch: Path) -> tuple[str, str, str, str]:
    """Device synchronizes per batch, one 4-batch shard through the in-process worker on the tiny model
    with its stage timers' events on the emulated accelerator (the tiny model runs on the CPU; the
    emulated device counts what the timers ask of a device): as the timers time now (device events),
    and as they did before (a synchronize before and after each section, replayed); then a whole shard
    of `model.kind: emulated`, whose host waits for the device once per batch at most (its copy back's
    event, never the whole device)."""
    from contextlib import contextmanager

    import pyarrow as pa
    import pyarrow.parquet as pq

    import imagemill
    from imagemill.testing.in_process import load_worker, run_shards
    from imagemill.workers.generators.emulated import EmulatedDevice, EmulatedEvent
    from imagemill.workers.stage_timer import StageTimer

    batches, rows = 4, 4 * BATCH
    pq.write_table(
        pa.table({"id": [f"r{i}" for i in range(rows)], "prompt": ["p"] * rows}), scratch / "s.parquet"
    )

    def spec(output: str, model_section: dict):
        return imagemill.build_spec(
            {
                "input": {"path": str(scratch / "s.parquet"), "rows_per_shard": rows},
                "output": {"path": str(scratch / output)},
                "model": model_section,
                "generation": {"width": SIZE, "height": SIZE, "num_inference_steps": 2},
                "workers": {"batch_size": BATCH},
            }
        )

    syncs: list[int] = []
    synchronize, event_synchronize = EmulatedDevice.synchronize, EmulatedEvent.synchronize

    def counted(device):
        syncs.append(1)
        synchronize(device)

    def waited(event):  # a wait for one event the device has not reached yet
        if not event.query():
            syncs.append(1)
        event_synchronize(event)

    def per_batch(worker, timing=StageTimer.timing, events: bool = False) -> float:
        """Synchronizes per batch of one shard on `worker`, its timers timing with `timing`; `events`:
        the waits for a single event too."""
        syncs.clear()
        real = StageTimer.timing
        StageTimer.timing, EmulatedDevice.synchronize = timing, counted
        if events:
            EmulatedEvent.synchronize = waited
        try:
            run_shards(worker)
        finally:
            StageTimer.timing, EmulatedDevice.synchronize = real, synchronize
            EmulatedEvent.synchronize = event_synchronize
        return len(syncs) / batches

    def tiny_on_emulated(output: str):
        worker = load_worker(spec(output, {"source": str(model), "device": "cpu"}))
        device = EmulatedDevice(depth=1024)
        worker.generator.stage_timer.events = worker.selection.timer.events = device.event
        return worker, device

    worker, device = tiny_on_emulated("after")
    after = per_batch(worker)
    worker, device = tiny_on_emulated("before")
    timing = StageTimer.timing

    @contextmanager
    def synchronizing(timer, stage):  # the device timers before issue #27's fix: a sync around each section
        on_device = timer.events == device.event  # not the shard's host timer (read, writers, waits)
        if on_device:
            device.synchronize()
        with timing(timer, stage):
            yield
        if on_device:
            device.synchronize()

    before = per_batch(worker, synchronizing)
    emulated = per_batch(
        load_worker(spec("emulated", {"kind": "emulated", "emulation": {"images_per_second": 400}})),
        events=True,
    )
    return (
        "stage_timer synchronising the device",
        "device synchronizes per batch, one 4-batch shard, tiny model, its stage timers on the emulated "
        "accelerator: synchronizing around each section (before) vs device events (now); and a "
        "`model.kind: emulated` shard, all of it (`python bench/gpu_loss.py`)",
        f"timers' synchronizes per batch: before {before:g}, now {after:g}; emulated shard: {emulated:g} "
        "host waits per batch in all (its copy back's event)",
        "fixed: stages are timed by device events read once the batch's copy back is done "
        "(workers/stage_timer.py; tests/test_stage_timer.py)"
        if after == 0 and emulated <= 1
        else "confirmed: the timers still synchronize",
    )


def batch_boundary(scratch: Path, rounds: int = 3) -> tuple[str, str, str, str]:
    """The device's wait at each batch boundary: a shard's busy share on the emulated accelerator
    (bench/device_busy.py's in-process measure) with each batch's launch returning only once its copy
    back is done, as the model thread did before issue #27's pipeline (replayed), vs as it does now,
    alternating rounds."""
    from device_busy import measure

    from imagemill.workers.selection import Selection

    launch = Selection.launch

    def waiting_launch(self, batch):  # before: the model thread waited for the copy back
        launched = launch(self, batch)
        launched.model_seconds()
        return launched

    size, rate, image_format = 512, 60.0, "jpeg"

    def busy(before: bool) -> float:
        Selection.launch = waiting_launch if before else launch
        try:
            return measure(scratch, str(scratch), size, rate, image_format, 6.0, 2.0, in_process=True)["busy"]
        finally:
            Selection.launch = launch

    shares = [(busy(True), busy(False)) for _ in range(rounds)]
    before, now = (statistics.median(side) for side in zip(*shares, strict=True))
    return (
        "the device waiting at each batch boundary (the copy back's synchronize, then the next batch's "
        "first launches)",
        f"emulated accelerator, {size}² {rate:g} images/s {image_format.upper()}, 20 steps, batch 16, "
        "2 ms GIL-held launch per step, 360 rows, the worker in process: the model thread waiting for "
        "each copy back before the next launch (before, replayed) vs launching the next batch first "
        f"(now), medians of {rounds} alternating rounds (`python bench/gpu_loss.py`)",
        f"device busy: before {before:.3f}, now {now:.3f}",
        (
            f"confirmed and fixed: +{now - before:.3f} of the device (workers/selection.py `launch`/"
            "`choose`; tests/test_emulated_device.py)"
            if now - before > 0.005
            else "ruled out (within 0.005)"
        ),
    )


def gil_contention() -> tuple[str, str, str, str]:
    from imagemill.core.encode_rates import cores_to_encode
    from imagemill.core.images import encode_image
    from imagemill.workers.generators.contract import BatchKey
    from imagemill.workers.generators.emulated import EmulatedGenerator

    key, seeds, batches = BatchKey(512, 512, 20, 1.0), list(range(16)), 4

    def busy(image_format: str | None) -> float:
        """The device's busy share over `batches` batches, each batch's 16 images handed to 4 writer
        threads as the worker hands them (encoded while the next batch generates), or not encoded."""
        generator = EmulatedGenerator(30.0, 0.002, queue_depth=1024)
        generator.generate(["p"], [None], [0], key)  # warm: textures drawn
        generator.device.synchronize()
        generator.device.busy_seconds = 0.0
        with ThreadPoolExecutor(4) as writers:
            started = time.perf_counter()
            for _ in range(batches):
                images = generator.generate(["p"] * 16, [None] * 16, seeds, key)
                generator.device.synchronize()  # the copy back: the images are written
                images = images.numpy()
                if image_format:
                    for image in images:
                        writers.submit(encode_image, image, image_format, 90)
            took = time.perf_counter() - started
        return generator.device.busy_seconds / took

    rounds = [(busy(None), busy("png"), busy("jpeg")) for _ in range(5)]  # alternating: load drifts alike
    alone, png, jpeg = (statistics.median(shares) for shares in zip(*rounds, strict=True))
    return (
        "GIL contention: writer threads against the thread launching kernels",
        f"emulated accelerator, 512² 30 images/s, 2 ms GIL-held launch per step, {batches} batches of 16, "
        "each batch encoded by 4 writer threads while the next generates, vs not encoded "
        "(`python bench/gpu_loss.py`)",
        f"device busy, medians of 5 alternating rounds: not encoded {alone:.3f}, PNG {png:.3f}, "
        f"JPEG {jpeg:.3f}",
        "; ".join(
            f"{name}: "
            + ("ruled out (within 0.02)" if share >= alone - 0.02 else f"{alone - share:.3f} lost")
            + f", needs {cores_to_encode(30.0, name.lower(), 512, 512)} cores at this rate"
            for name, share in (("JPEG", jpeg), ("PNG", png))
        )
        + f" (this machine: {os.cpu_count()}; beyond them the loss is cores, not only the GIL)",
    )


def allocation_churn(model: Path) -> tuple[str, str, str, str]:
    import imagemill
    from imagemill.workers.generators.contract import BatchKey
    from imagemill.workers.worker import make_generator

    spec = imagemill.build_spec(
        {
            "input": {"path": "/in"},
            "output": {"path": "/out"},
            "model": {"source": str(model), "device": "cpu"},
        }
    )
    generator = make_generator(spec, "cpu")
    a, b = BatchKey(SIZE, SIZE, 2, GUIDANCE), BatchKey(SIZE * 2, SIZE, 2, GUIDANCE)

    def seconds(key: BatchKey) -> float:
        started = time.perf_counter()
        generator.generate(["p"] * BATCH, [None] * BATCH, list(range(BATCH)), key)
        return time.perf_counter() - started

    seconds(a), seconds(b)
    same, switched = [], []
    for _ in range(5):
        same.append(seconds(a))
        seconds(b)
        switched.append(seconds(a))
    ratio = statistics.median(switched) / statistics.median(same)
    return (
        "allocation churn between batches of different shapes",
        f"generate at {SIZE}² after a {2 * SIZE}x{SIZE} batch vs after another {SIZE}² one, tiny model, CPU, "
        "medians of 5 (`python bench/gpu_loss.py`)",
        f"{ratio:.2f}x the same-shape time",
        ("ruled out on CPU" if ratio < 1.05 else "confirmed on CPU")
        + "; the CUDA caching allocator's share needs the GPU (bench/gpu.sh's worker vs bare)",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=os.path.join(tempfile.gettempdir(), "imagemill-bench-models"))
    parser.add_argument("--no-write", action="store_true", help="print the section, leave BENCHMARKS.md")
    args = parser.parse_args()
    from throughput import build_model

    model = build_model("cpu", Path(args.models))
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as scratch:
        rows = [
            *host_ops(model),
            timer_syncs(model, Path(scratch)),
            batch_boundary(Path(scratch)),
            gil_contention(),
            allocation_churn(model),
        ]
    command = " ".join(["python bench/gpu_loss.py", *sys.argv[1:]])
    end = os.getloadavg()[0]
    quiet = "a quiet machine" if max(load, end) < 2 else "shared by other jobs: re-run the timed rows quiet"
    lines = [
        "## Device-time loss candidates, measured on the CPU",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d} on {_machine()}, load average {load:.2f} at the start, "
        f"{end:.2f} at the end ({quiet}). Reproduce: `{command}`",
        "",
        "| candidate | how measured | number | verdict |",
        "| --- | --- | --- | --- |",
        *(f"| {' | '.join(row)} |" for row in rows),
        "",
    ]
    publish("\n".join(lines), write=not args.no_write)


if __name__ == "__main__":
    main()
