"""Stage timing on a device adds no synchronize (issue #27): a device stage is timed by two events
recorded on the device's queue and read after the batch's one synchronize. Shown on the emulated
accelerator (workers/generators/emulated.py), whose events have torch.cuda.Event's API and are stamped
by its device thread on its own clock, as a GPU stamps CUDA events."""

from __future__ import annotations

import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import imagemill
from imagemill.testing.in_process import load_worker, run_shards
from imagemill.workers.generators import emulated
from imagemill.workers.generators.emulated import EmulatedDevice, EmulatedEvent
from imagemill.workers.stage_timer import StageTimer

# (stage, device seconds of each kernel launched in it): a batch's model stages, launched ahead
BATCH = (("text_encode", [0.02]), ("denoise", [0.03] * 4), ("decode", [0.04]))


def _counting_syncs(monkeypatch) -> list[int]:
    """Every EmulatedDevice.synchronize call, counted."""
    calls: list[int] = []
    synchronize = EmulatedDevice.synchronize

    def counted(self):
        calls.append(1)
        synchronize(self)

    monkeypatch.setattr(EmulatedDevice, "synchronize", counted)
    return calls


@pytest.mark.parametrize("late_wake", [0.0, 0.02])
def test_device_stages_take_the_device_time_between_their_events_with_one_sync(monkeypatch, late_wake):
    """The host only queues each stage's kernels (milliseconds), yet each stage is charged its device
    time, and the stages add up to the time the device was busy: the seconds come from the device's
    stamps, read after the one synchronize. A device thread woken 20 ms late after each kernel (a loaded
    CPU) does not stretch them: the stamps are the device's clock, not the thread's."""
    real_sleep = time.sleep
    monkeypatch.setattr(emulated.time, "sleep", lambda seconds: real_sleep(seconds + late_wake))
    syncs = _counting_syncs(monkeypatch)
    device = EmulatedDevice(depth=64)
    timer = StageTimer(device.event)
    host = 0.0
    for stage, kernels in BATCH:
        started = time.perf_counter()
        with timer.timing(stage):
            for seconds in kernels:
                device.launch(seconds)
        host += time.perf_counter() - started
    device.synchronize()  # the batch's copy back
    seconds = timer.take()
    assert syncs == [1]
    assert host < 0.05, "the host only queued the kernels"
    for stage, kernels in BATCH:
        assert seconds[stage] == pytest.approx(sum(kernels), abs=0.005), (stage, seconds)
    assert sum(seconds.values()) == pytest.approx(device.busy_seconds, abs=0.005)


def test_a_shard_on_the_emulated_device_synchronizes_it_once_per_batch(tmp_path, monkeypatch):
    """Through the worker: the selection's device stages are timed by the emulated device's events, so
    the host waits once per batch (for its copy back's event, not for the whole device, whose next
    batch is queued behind it) and never for the timer."""
    rows, batch = 8, 4
    pq.write_table(
        pa.table({"id": [f"r{i}" for i in range(rows)], "prompt": ["p"] * rows}), tmp_path / "p.parquet"
    )
    spec = imagemill.build_spec(
        {
            "input": {"path": str(tmp_path / "p.parquet"), "rows_per_shard": rows},
            "output": {"path": str(tmp_path / "out")},
            "model": {"kind": "emulated", "emulation": {"images_per_second": 400}},
            "generation": {"width": 32, "height": 32, "num_inference_steps": 2},
            "workers": {"batch_size": batch},
        }
    )
    worker = load_worker(spec)
    recorded: list[EmulatedEvent] = []
    record = EmulatedEvent.record

    def recording(event):
        recorded.append(event)
        record(event)

    waits: list[EmulatedEvent] = []
    event_synchronize = EmulatedEvent.synchronize

    def waiting(event):  # a wait for an event the device has not reached: the host blocks
        if not event.query():
            waits.append(event)
        event_synchronize(event)

    monkeypatch.setattr(EmulatedEvent, "record", recording)
    monkeypatch.setattr(EmulatedEvent, "synchronize", waiting)
    syncs = _counting_syncs(monkeypatch)
    (stats,) = run_shards(worker)
    assert stats.ok == rows
    assert recorded, "the device stages were timed by the device's events"
    assert syncs == [], "the whole device is never synchronized"
    assert len(waits) <= rows // batch, f"{len(waits)} waits for {rows // batch} batches"
    assert stats.stage_seconds["copy_back"] >= 0


def test_seconds_taken_before_the_sync_wait_for_the_stage_alone_not_for_the_device(monkeypatch):
    """Read early (no synchronize yet), a stage's seconds wait for its own end event, never for work
    queued after it: the device is not synchronized and the later kernels still run on."""
    syncs = _counting_syncs(monkeypatch)
    device = EmulatedDevice(depth=64)
    timer = StageTimer(device.event)
    with timer.timing("decode"):
        device.launch(0.05)
    device.launch(0.5)  # the next batch's kernels, queued behind the stage
    started = time.perf_counter()
    assert timer.take()["decode"] == pytest.approx(0.05, abs=0.005)
    assert time.perf_counter() - started < 0.3, "waited for the stage, not for the work after it"
    assert syncs == []
