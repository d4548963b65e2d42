"""What a job's devices cost: device-seconds per shard, priced by `cost.gpu_hour_usd`, summed per job.

A shard's `device_seconds` is the time it held its actor's device (its model turn: the model's stages,
and the wait for its read or its writes while the device sat reserved for it) times the devices the
actor holds: GPU-seconds on a GPU (one per actor), CPU-seconds on CPU (`num_cpus_per_worker` per
actor); `device_kind` says which. The actor prices its shard when it commits, at the price of the run
that made it, so a job's cost is the sum of its shards' and stays what was paid when a later run
changes the price. Shared contract: the actor prices, the driver, status and report add up.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from imagemill.core.records import ShardStats

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


@dataclass(frozen=True)
class JobCost:
    """Device time and cost summed over a job's committed shards."""

    device_seconds: float  # shards of an imagemill before device time count nothing
    device_kinds: list[str]  # GPU, CPU: what the seconds are
    cost_usd: float | None  # the priced shards' sum; None when no shard is priced
    unpriced_device_seconds: float  # of shards without a price (none set, or none for their device)
    images: int  # images made (ok and filtered rows), what a price per image divides by

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
        }

    def text(self) -> str:
        """One line: `12.5 GPU-seconds, $0.0104 ($0.81 / 1,000 images)`."""
        line = device_time(self.device_seconds, self.device_kinds)
        if self.cost_usd is not None:
            line += f", ${self.cost_usd:.4f}"
            if self.usd_per_1000_images is not None:
                line += f" (${self.usd_per_1000_images:.4f} / 1,000 images)"
        if self.cost_usd is not None and self.unpriced_device_seconds:
            line += f"; {device_time(self.unpriced_device_seconds, self.device_kinds)} without a price"
        return line


def job_cost(shards: Iterable[ShardStats]) -> JobCost:
    shards = sorted(shards, key=lambda stats: stats.shard_id)  # one order: the same sum every time
    costs = [stats.cost_usd for stats in shards if stats.cost_usd is not None]
    return JobCost(
        device_seconds=sum(stats.device_seconds or 0.0 for stats in shards),
        device_kinds=sorted({stats.device_kind for stats in shards if stats.device_kind}),
        cost_usd=sum(costs) if costs else None,
        unpriced_device_seconds=sum(
            stats.device_seconds or 0.0 for stats in shards if stats.cost_usd is None
        ),
        images=sum(stats.ok + stats.filtered for stats in shards),
    )
