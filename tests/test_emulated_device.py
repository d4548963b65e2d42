"""The emulated accelerator (`model.kind: emulated`, workers/generators/emulated.py): a device queue that
runs each batch's time without the GIL, fed by launch work that holds it, so that bench/device_busy.py
can measure on a CPU what share of a GPU's time imagemill keeps busy."""

from __future__ import annotations

import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import imagemill
from imagemill.core.errors import ImagemillError
from imagemill.core.stage_table import MODEL_STAGES
from imagemill.testing.in_process import load_worker, run_shards
from imagemill.workers import shard_records
from imagemill.workers.generators import emulated
from imagemill.workers.generators.contract import BatchKey
from imagemill.workers.generators.emulated import (
    EmulatedDevice,
    EmulatedGenerator,
    _python_work,
)
from imagemill.workers.worker import ShardWorker


def _spec(tmp_path, **model):
    return imagemill.build_spec(
        {"input": {"path": str(tmp_path)}, "output": {"path": str(tmp_path / "out")}, "model": model}
    )


def _job(tmp_path, rows: int, **emulation):
    """A one-shard job of `rows` rows, 32² in 2 steps, batches of 4, on the emulated device."""
    pq.write_table(
        pa.table({"id": [f"r{i}" for i in range(rows)], "prompt": ["p"] * rows}), tmp_path / "p.parquet"
    )
    return imagemill.build_spec(
        {
            "input": {"path": str(tmp_path / "p.parquet"), "rows_per_shard": rows},
            "output": {"path": str(tmp_path / "out")},
            "model": {"kind": "emulated", "emulation": emulation},
            "generation": {"width": 32, "height": 32, "num_inference_steps": 2},
            "workers": {"batch_size": 4},
        }
    )


def test_the_device_is_busy_for_the_rate_and_the_images_are_textured_by_seed():
    generator = EmulatedGenerator(images_per_second=40, launch_seconds_per_step=0.0, queue_depth=64)
    started = time.perf_counter()
    images = generator.generate(["p"] * 4, [None] * 4, [0, 1, 8, 9], BatchKey(64, 48, 4, 1.0))
    generator.device.synchronize()  # the copy back's wait: the images are written by then
    assert time.perf_counter() - started >= 0.1  # 4 images at 40/s
    assert generator.device.busy_seconds == pytest.approx(0.1)
    pixels = images.numpy()
    assert pixels.shape == (4, 48, 64, 3) and pixels.dtype == np.uint8
    assert np.array_equal(pixels[0], pixels[2]) and not np.array_equal(pixels[0], pixels[1])  # seed mod 8
    assert pixels[0].std() > 10, "textured, not flat: encoding costs what it does for real images"


def test_the_device_idles_while_another_thread_keeps_the_launches_from_the_gil():
    """The point of the emulation: launch work needs the GIL, so a thread busy in Python slows the
    launches and the device waits; device time alone (no launches) is not slowed."""
    rate, steps, seeds = 50.0, 20, list(range(8))

    def wall(launch_seconds: float, hog: bool) -> float:
        generator = EmulatedGenerator(rate, launch_seconds, queue_depth=1)
        stop = threading.Event()
        hogger = threading.Thread(target=lambda: [_python_work(10_000) for _ in iter(stop.is_set, True)])
        if hog:
            hogger.start()
        started = time.perf_counter()
        generator.generate(["p"] * 8, [None] * 8, seeds, BatchKey(8, 8, steps, 1.0))
        generator.device.synchronize()
        took = time.perf_counter() - started
        stop.set()
        if hog:
            hogger.join()
        return took

    step_launch = len(seeds) / rate / steps  # launches alone just keep up with the device
    alone, contended = wall(step_launch, hog=False), wall(step_launch, hog=True)
    assert contended > 1.4 * alone, (alone, contended)


def test_the_emulation_goes_with_its_kind(tmp_path):
    assert (
        _spec(tmp_path, kind="emulated", emulation={"images_per_second": 7}).model.emulation.queue_depth > 0
    )
    with pytest.raises(ImagemillError, match="model.kind: emulated needs model.emulation"):
        _spec(tmp_path, kind="emulated")
    with pytest.raises(ImagemillError, match="model.emulation is set without model.kind: emulated"):
        _spec(tmp_path, kind="noop", emulation={"images_per_second": 7})


def _slowed(monkeypatch, method: str, seconds: float) -> None:
    """ShardWorker's `method`, `seconds` slower per call (planted host work or a slow writer)."""
    real = getattr(ShardWorker, method)

    def slow(self, *args):
        time.sleep(seconds)
        return real(self, *args)

    monkeypatch.setattr(ShardWorker, method, slow)


def _turn(stats) -> float:
    return stats.timeline["model"][1] - stats.timeline["model"][0]


def test_the_worker_reports_the_host_work_between_the_models_calls(tmp_path, monkeypatch):
    """The `host` stage is the model turn's time outside the device stages and the waits: 30 ms of
    host work planted per batch's hand-off, which the next batch's draw (a few ms) cannot hide, shows up
    there, and the turn's seconds add up."""
    spec = _job(tmp_path, 16, images_per_second=4000, launch_ms_per_step=0)
    _slowed(monkeypatch, "_write", 0.03)
    (stats,) = run_shards(load_worker(spec))
    stages = stats.stage_seconds
    assert stages["host"] >= 3 * 0.03  # four hand-offs, less the few ms of the draws beside them
    turn = _turn(stats)
    in_turn = sum(stages[stage] for stage in MODEL_STAGES) + stages["host"]
    assert in_turn == pytest.approx(turn, abs=0.01 + stages["idle"])


def test_a_wait_for_slow_writers_is_idle_once_the_device_has_nothing_left(tmp_path, monkeypatch):
    """Writers slower than the device (40 ms per image on 4 threads against 2.5 ms per image): the
    worker waits for them before it launches more (backpressure), and that wait is the model's
    `idle` from the moment the device finished the batch launched ahead, read from the device's
    events without waiting for them; the turn's seconds still add up to the turn."""
    spec = _job(tmp_path, 32, images_per_second=400)  # 8 batches of 4: 80 ms of device time
    _slowed(monkeypatch, "_write_image", 0.04)
    (stats,) = run_shards(load_worker(spec))
    stages = stats.stage_seconds
    turn = _turn(stats)
    device = 32 / 400
    assert stages["idle"] >= 0.5 * (turn - device), (turn, stages)
    in_turn = sum(stages[stage] for stage in MODEL_STAGES) + stages["host"] + stages["idle"]
    assert in_turn == pytest.approx(turn, abs=0.05), (turn, stages)


def test_the_next_batch_is_drawn_while_the_last_one_is_handed_to_the_writers(tmp_path, monkeypatch):
    """The model thread goes from one batch straight to the next (issue #27): each batch's draw is
    queued before the previous batch is handed to the writers, so a hand-off (30 ms planted here, less
    than a batch's 62 ms of device time) happens while the device works, not between its batches. The
    order is asserted, not the time: the next draw is queued before the hand-off starts."""
    spec = _job(tmp_path, 12, images_per_second=64)
    events = []
    generating, handing_over = EmulatedGenerator.generate, ShardWorker._write

    def recorded_generate(self, prompts, negatives, seeds, key, **given):
        events.append(("draw", seeds[0]))
        return generating(self, prompts, negatives, seeds, key, **given)

    def slow_hand_over(self, run, writer, batch, drawn, ahead=None):
        time.sleep(0.03)
        handing_over(self, run, writer, batch, drawn, ahead)
        events.append(("handed", batch[0].seed))

    monkeypatch.setattr(EmulatedGenerator, "generate", recorded_generate)
    monkeypatch.setattr(ShardWorker, "_write", slow_hand_over)
    run_shards(load_worker(spec))
    seeds = [seed for kind, seed in events if kind == "draw"]
    assert len(seeds) == 3
    # batch n + 1 is being drawn before batch n is handed over; the last is handed over alone
    assert events == [
        ("draw", seeds[0]),
        ("draw", seeds[1]),
        ("handed", seeds[0]),
        ("draw", seeds[2]),
        ("handed", seeds[1]),
        ("handed", seeds[2]),
    ]


def test_the_next_batch_is_queued_on_the_device_before_the_last_one_is_copied_back(tmp_path, monkeypatch):
    """The device does not wait at a batch boundary (issue #27): the model thread launches batch n + 1
    while the device still runs batch n, its kernels queued behind n's copy back, which the shard's
    thread waits for instead. Each batch's first step is launched while the device is busy (its clock
    ahead of the host's), but the first batch's, on an idle device; waiting for the copy back on the
    model thread, as before, launched every batch on an idle device. The images are those of a
    batch-at-a-time run (the determinism tests hold that across settings)."""
    spec = _job(tmp_path, 16, images_per_second=20)  # 4 batches of 4, each 200 ms on the device
    busy_at_batch_start: list[bool] = []
    batch_starts = [True]  # the next step launched starts a batch
    launch = EmulatedDevice.launch

    def recording(self, seconds, work=None):
        if seconds > 0 and batch_starts[0]:  # a batch's first step (an event takes no device time)
            launched = time.perf_counter()

            def starting() -> None:  # on the device thread, as the step starts: was it queued in time?
                busy_at_batch_start.append(launched < self._free_at)

            assert work is None
            work = starting
        if seconds > 0:
            batch_starts[0] = work is not None and work.__name__ == "decode"  # the batch's last step
        launch(self, seconds, work)

    monkeypatch.setattr(EmulatedDevice, "launch", recording)
    (stats,) = run_shards(load_worker(spec))
    assert stats.ok == 16
    assert busy_at_batch_start == [False, True, True, True]


def test_the_batch_images_are_made_on_the_device_thread_not_the_launching_one(monkeypatch):
    """Making the batch's output (16 images stacked: 12.6 MB at 512²) on the launching thread, after the
    synchronize, left the device idle for it every batch (issue #27); the device thread makes it within
    the last step's time, as a GPU's decode writes its output on the device."""
    made_on = []
    real = emulated.textured

    def recording(height, width, seed):
        made_on.append(threading.current_thread().name)
        return real(height, width, seed)

    monkeypatch.setattr(emulated, "textured", recording)
    generator = EmulatedGenerator(images_per_second=400, launch_seconds_per_step=0.0, queue_depth=64)
    images = generator.generate(["p"] * 3, [None] * 3, [0, 1, 2], BatchKey(16, 16, 4, 1.0))
    generator.device.synchronize()
    assert images.shape == (3, 16, 16, 3)
    assert set(made_on) == {"emulated-device"}


def test_the_device_keeps_its_own_clock_when_its_thread_wakes_late(monkeypatch):
    """A GPU runs queued kernels whatever the CPU's scheduler does: a device thread woken 20 ms late
    (a loaded CPU) after each step must not add 20 ms to each step's device time when the steps were
    launched ahead; only the last wake-up is seen by the caller."""
    real_sleep = time.sleep
    monkeypatch.setattr(emulated.time, "sleep", lambda seconds: real_sleep(seconds + 0.02))
    generator = EmulatedGenerator(images_per_second=100, launch_seconds_per_step=0.0, queue_depth=64)
    for seed in range(emulated.TEXTURES):  # drawn at load, as from_spec does: no work overruns a step
        emulated.textured(8, 8, seed)
    started = time.perf_counter()
    generator.generate(["p"] * 10, [None] * 10, list(range(10)), BatchKey(8, 8, 10, 1.0))
    generator.device.synchronize()
    took = time.perf_counter() - started
    assert generator.device.busy_seconds == pytest.approx(0.1)
    assert took < 0.1 + 0.1, took  # late by 20 ms per step on the thread's clock would be 0.3 s
    # on the device's own clock the ten steps ran back to back from the first launch: a thread more
    # than a step behind (late by 20 ms on 10 ms steps) lost none of the late time to the device
    assert generator.device._free_at - started == pytest.approx(0.1, abs=0.01)


def test_the_report_thumbnails_are_made_on_the_writer_threads_not_while_the_device_waits(
    tmp_path, monkeypatch
):
    """The shard's sample thumbnails (a resize and a JPEG each) were made on the model's thread between
    batches, where the device waited for them (issue #27); they are made on the writer threads, and the
    stats still carry them, in batch order."""
    spec = _job(tmp_path, 8, images_per_second=400)
    made_on = []
    real = shard_records.thumbnail_data_uri

    def recording(pixels):
        made_on.append(threading.current_thread().name)
        return real(pixels)

    monkeypatch.setattr(shard_records, "thumbnail_data_uri", recording)
    (stats,) = run_shards(load_worker(spec))
    assert made_on and all(name.startswith("imagemill-writer") for name in made_on), made_on
    assert [sample.id for sample in stats.samples] == ["r0", "r1"]
    assert all(sample.thumbnail.startswith("data:image/jpeg;base64,") for sample in stats.samples)
