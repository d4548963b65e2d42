"""The device an actor holds, for its attempts' device time and cost (imagemill.core.cost.DeviceUse): what
kind it is, its accelerator type as Ray names it (the key of `cost.gpu_hour_usd`'s map), how many the
actor holds, and their price per hour."""

from __future__ import annotations

from imagemill.core.cost import CPU, GPU, DeviceUse, hourly_price
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


def device_use(device: str, spec: JobSpec) -> DeviceUse:
    if device.startswith("cuda"):
        # a replica's GPUs (a share of one, or a gang's: its leader reports for all of them)
        kind, accelerator, count = GPU, _accelerator_type(), float(spec.workers.gpus_per_worker)
    else:
        kind, accelerator, count = CPU, None, float(spec.workers.num_cpus_per_worker)
    return DeviceUse(kind, accelerator, count, hourly_price(spec.cost.gpu_hour_usd, kind, accelerator))
