"""What a job's devices cost: device-seconds per attempt of a shard, priced by `cost.gpu_hour_usd`.

An attempt's `device_seconds` is the time it held its actor's device (its model turn: the model's
stages, and the wait for its read or its writes while the device sat reserved for it) times the
devices the actor holds: GPU-seconds on a GPU (one per actor), CPU-seconds on CPU
(`num_cpus_per_worker` per actor); `device_kind` says which. The actor prices its attempt when it
ends, at the price of the run that made it, so a job's cost stays what was paid when a later run
changes the price. The sums over a job's attempts are the device-time ledger's
(imagemill.core.device_ledger), the one place that says what device time counts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from imagemill.core.records import MAX_COST_USD, MAX_DEVICE_SECONDS, RecordPart

GPU = "GPU"
CPU = "CPU"  # also the key of `cost.gpu_hour_usd`'s map that prices CPU workers' CPU-hours


def hourly_price(
    gpu_hour_usd: float | Mapping[str, float] | None, device_kind: str, accelerator_type: str | None
) -> float | None:
    """USD per device-hour: a number prices any device-hour (a GPU's, or one CPU's on CPU workers);
    a map prices by accelerator type as Ray names it (`H100`, `A10G`; `CPU` for CPU workers). None
    when there is no price, or the map has none for this device: its shards stay unpriced."""
    if gpu_hour_usd is None or isinstance(gpu_hour_usd, int | float):
        return gpu_hour_usd
    return gpu_hour_usd.get(CPU if device_kind == CPU else accelerator_type or "")


def device_time(seconds: float, device_kinds: Iterable[str]) -> str:
    """Device time as `imagemill status`, the run's summary and the report all write it: seconds under
    an hour, hours from one hour, 3 significant digits (`17.4 CPU-seconds`, `2.51 GPU-hours`)."""
    kinds = "/".join(device_kinds) or "device"
    amount, unit = (seconds, "seconds") if seconds < 3600 else (seconds / 3600, "hours")
    return f"{amount:.3g} {kinds}-{unit}" if amount < 1000 else f"{amount:,.0f} {kinds}-{unit}"


def priced(device_seconds: float, usd_per_hour: float | None) -> float | None:
    return None if usd_per_hour is None else device_seconds / 3600 * usd_per_hour


class DeviceCharge(RecordPart):
    """The device time one attempt of a shard held, priced: what the device-time ledger
    (imagemill.core.device_ledger) counts, committed or not, and a shard's stats carry."""

    # A record that says less than nothing, or more than any sum can hold, does not read (records.py).
    device_seconds: float = Field(ge=0, le=MAX_DEVICE_SECONDS)  # GPU- or CPU-seconds, as device_kind says
    device_kind: str
    accelerator_type: str | None  # as Ray names it (H100, A10G); None on CPU or when unknown
    cost_usd: float | None = Field(ge=0, le=MAX_COST_USD)  # None without a price for its device


@dataclass(frozen=True)
class DeviceUse:
    """The devices an actor holds (imagemill.workers.device_use finds them): their kind, accelerator
    type, count and price. The actor charges its attempts with it; it also tells the driver, which
    charges an attempt that died without a report (imagemill.execution.scheduler)."""

    kind: str  # GPU | CPU
    accelerator_type: str | None
    count: float  # devices held: a replica's GPUs (gpus_per_worker), or num_cpus_per_worker CPUs
    usd_per_hour: float | None  # per device

    def charge(self, held_seconds: float) -> DeviceCharge:
        """What `held_seconds` on the actor's devices cost."""
        device_seconds = round(max(held_seconds, 0.0) * self.count, 3)
        return DeviceCharge(
            device_seconds=device_seconds,
            device_kind=self.kind,
            accelerator_type=self.accelerator_type,
            cost_usd=priced(device_seconds, self.usd_per_hour),
        )


@dataclass(frozen=True)
class JobCost:
    """Device time and cost of a job: the device-time ledger's totals (imagemill.core.device_ledger)."""

    device_seconds: float  # every attempt's; shards of an imagemill before device time count nothing
    device_kinds: list[str]  # GPU, CPU: what the seconds are
    cost_usd: float | None  # the priced attempts' sum; None when no attempt is priced
    unpriced_device_seconds: float  # of attempts without a price (none set, or none for their device)
    images: int  # images made (ok and filtered rows), what a price per image divides by
    failed_attempts: int = 0  # attempts that committed nothing; their time is in device_seconds
    failed_device_seconds: float = 0.0

    @property
    def usd_per_1000_images(self) -> float | None:
        if self.cost_usd is None or not self.images:
            return None
        return self.cost_usd / self.images * 1000

    def to_json(self) -> dict[str, Any]:
        return {
            "device_seconds": round(self.device_seconds, 3),
            "device_kinds": self.device_kinds,
            "cost_usd": self.cost_usd,
            "usd_per_1000_images": self.usd_per_1000_images,
            "unpriced_device_seconds": round(self.unpriced_device_seconds, 3),
            "images": self.images,
            "failed_attempts": self.failed_attempts,
            "failed_device_seconds": round(self.failed_device_seconds, 3),
        }

    def text(self) -> str:
        """One line: `12.5 GPU-seconds, $0.0104 ($0.81 / 1,000 images); 2.1 GPU-seconds in 3 failed
        attempts`."""
        line = device_time(self.device_seconds, self.device_kinds)
        if self.cost_usd is not None:
            line += f", ${self.cost_usd:.4f}"
            if self.usd_per_1000_images is not None:
                line += f" (${self.usd_per_1000_images:.4f} / 1,000 images)"
        if self.cost_usd is not None and self.unpriced_device_seconds:
            line += f"; {device_time(self.unpriced_device_seconds, self.device_kinds)} without a price"
        if self.failed_attempts:
            failed = device_time(self.failed_device_seconds, self.device_kinds)
            line += f"; {failed} in {self.failed_attempts} failed attempts"
        return line
