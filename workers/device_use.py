"""The device an actor holds, for its shards' device time and cost (imagemill.core.cost): what kind it is,
its accelerator type as Ray names it (the key of `cost.gpu_hour_usd`'s map), how many the actor
holds, and their price per hour."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from imagemill.core.cost import CPU, GPU, hourly_price, priced
from imagemill.core.spec import JobSpec

ACCELERATOR_LABEL = "ray.io/accelerator-type"  # the node label Ray sets from the GPU's name


def _accelerator_type() -> str | None:
    """The node's accelerator type (H100, A10G, ...) from Ray's node labels; None outside Ray."""
    try:
        import ray

        label = ray.get_runtime_context().get_node_labels().get(ACCELERATOR_LABEL)
    except Exception:  # not in a Ray worker (the in-process worker of tests and benchmarks)
        return None
    return (label[0] if label else None) if isinstance(label, list) else label


@dataclass(frozen=True)
class DeviceUse:
    kind: str  # GPU | CPU
    accelerator_type: str | None
    count: float  # devices held: one GPU, or num_cpus_per_worker CPUs
    usd_per_hour: float | None  # per device

    def charge(self, held_seconds: float) -> dict[str, Any]:
        """A shard's ShardStats fields for `held_seconds` on the device."""
        device_seconds = held_seconds * self.count
        return {
            "device_seconds": round(device_seconds, 3),
            "device_kind": self.kind,
            "accelerator_type": self.accelerator_type,
            "cost_usd": priced(round(device_seconds, 3), self.usd_per_hour),
        }


def device_use(device: str, spec: JobSpec) -> DeviceUse:
    if device.startswith("cuda"):
        kind, accelerator, count = GPU, _accelerator_type(), 1.0
    else:
        kind, accelerator, count = CPU, None, float(spec.workers.num_cpus_per_worker)
    return DeviceUse(kind, accelerator, count, hourly_price(spec.cost.gpu_hour_usd, kind, accelerator))
