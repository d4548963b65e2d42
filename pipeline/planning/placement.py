"""Whether the actors a job asks for can be placed on the cluster, decided before waiting for them.

Ray keeps an actor that fits on no node pending forever, silently: `--num-workers 3` on two CPUs,
`model.device: cuda` without a GPU or `num_cpus_per_worker: 3` on a 2-CPU machine would hang with
nothing but Ray's autoscaler lines. So the driver counts how many actors fit on the nodes there are.
On a cluster that cannot grow, it starts only those (saying how many could not be placed) or, when
none fits, stops in one line naming the setting to change. On a cluster that can grow (an autoscaler
that launches nodes, or IMAGEMILL_WAIT_FOR_RESOURCES set) it asks for them all and waits.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import ray

from imagemill.core.errors import ImagemillError

log = logging.getLogger(__name__)
WAIT_ENV = "IMAGEMILL_WAIT_FOR_RESOURCES"  # set (to anything): always wait for the cluster to grow
AUTOSCALING_STATUS_KEY = "__autoscaling_status"  # what Ray's (v1) autoscaler publishes in the GCS
READONLY_NODE_TYPE_PREFIX = "node_"  # node types of the read-only provider: a cluster that never grows


@dataclass(frozen=True)
class WorkerDemand:
    """What one worker actor asks Ray for."""

    num_cpus: float
    num_gpus: float

    def describe(self, count: int) -> str:
        gpus = f", {self.num_gpus:g} GPU" if self.num_gpus else ""
        return f"{count} workers × ({self.num_cpus:g} CPU{gpus})"

    def fits_on(self, resources: dict[str, float]) -> int:
        """How many of these actors a node with `resources` holds (num_cpus is above 0: spec.py)."""
        counts = [resources.get("CPU", 0) // self.num_cpus]
        if self.num_gpus:
            counts.append(resources.get("GPU", 0) // self.num_gpus)
        return int(min(counts))


def _node_resources(excluded: frozenset[str] = frozenset()) -> list[dict[str, float]]:
    return [node["Resources"] for node in ray.nodes() if node.get("Alive") and node["NodeID"] not in excluded]


def room_outside(demand: WorkerDemand, excluded: frozenset[str]) -> bool:
    """Whether a worker could be placed on a live node outside `excluded` (the nodes being drained:
    imagemill.execution.drains), now or once the cluster grows."""
    return any(demand.fits_on(node) for node in _node_resources(excluded)) or cluster_can_grow()


def cluster_can_grow() -> bool:
    """Whether waiting can place more actors: IMAGEMILL_WAIT_FOR_RESOURCES is set, or an autoscaler
    that launches nodes runs (Ray's v2 autoscaler, or a v1 one whose node types come from a cluster
    config rather than the read-only provider every plain `ray start` head runs)."""
    if os.environ.get(WAIT_ENV):
        return True
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.experimental.internal_kv import _internal_kv_get

    try:
        if is_autoscaler_v2(fetch_from_server=True):
            return True
        status = _internal_kv_get(AUTOSCALING_STATUS_KEY)
    except Exception:  # noqa: BLE001 - no GCS answer about an autoscaler: treat as none
        return False
    if not status:
        return False
    report = json.loads(status).get("autoscaler_report") or {}
    node_types = set(report.get("active_nodes") or {}) | set(report.get("idle_nodes") or {})
    return any(not name.startswith(READONLY_NODE_TYPE_PREFIX) for name in node_types)


def _setting_to_change(demand: WorkerDemand, nodes: list[dict[str, float]]) -> str:
    if demand.num_gpus and not any(node.get("GPU", 0) >= demand.num_gpus for node in nodes):
        return "model.device (cuda asks for a GPU per worker; use cpu or auto on a cluster without GPUs)"
    most_cpus = max(
        (node.get("CPU", 0) for node in nodes if node.get("GPU", 0) >= demand.num_gpus), default=0
    )
    return f"workers.num_cpus_per_worker (at most {most_cpus:g} here)"


def placeable_workers(demand: WorkerDemand, requested: int) -> int:
    """How many of `requested` workers to start: all of them when they fit or the cluster can grow,
    else those that fit; none fitting is an ImagemillError naming the setting to change."""
    nodes = _node_resources()
    fit = sum(demand.fits_on(node) for node in nodes)
    if fit >= requested:
        return requested
    if cluster_can_grow():
        log.info("%s asked for, %d fit now; waiting for the cluster to grow", demand.describe(requested), fit)
        return requested
    has = ", ".join(f"{value:g} {name}" for name, value in sorted(ray.cluster_resources().items())
                    if name in ("CPU", "GPU"))  # fmt: skip
    if fit == 0:
        raise ImagemillError(
            f"no worker can be placed: the job asks for {demand.describe(requested)}, the cluster has "
            f"{has or 'no CPU'} and no autoscaler to add nodes; change {_setting_to_change(demand, nodes)}"
        )
    log.warning(
        "%d of %d workers cannot be placed (the cluster has %s, no autoscaler); running on %d "
        "(workers.num_workers=%d fits)",
        requested - fit,
        requested,
        has,
        fit,
        fit,
    )
    return fit
