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
import math
import os
from dataclasses import dataclass

import ray

from imagemill.core.errors import ImagemillError
from imagemill.core.spec.rules import gang_size

log = logging.getLogger(__name__)
WAIT_ENV = "IMAGEMILL_WAIT_FOR_RESOURCES"  # set (to anything): always wait for the cluster to grow
AUTOSCALING_STATUS_KEY = "__autoscaling_status"  # what Ray's (v1) autoscaler publishes in the GCS
READONLY_NODE_TYPE_PREFIX = "node_"  # node types of the read-only provider: a cluster that never grows


@dataclass(frozen=True)
class WorkerDemand:
    """What one worker (a model replica: one actor, or a gang's actors together on one node) asks Ray for."""

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


@dataclass(frozen=True)
class ReplicaPlan:
    """How one model replica is placed (`workers.gpus_per_worker`): `members` actors of `num_cpus` CPUs
    and `gpus_per_actor` GPUs each. One actor, unless the replica is a context-parallel gang: then one
    actor per GPU, placed together on one node (a placement group of STRICT_PACK bundles), rank 0 the
    leader that reads and writes the shard (imagemill.execution.replicas)."""

    num_cpus: float
    gpus_per_actor: float  # 0 on CPU; 1/n shares a GPU between n actors
    members: int = 1

    @property
    def gpus(self) -> float:
        return self.gpus_per_actor * self.members

    @property
    def demand(self) -> WorkerDemand:
        return WorkerDemand(self.num_cpus * self.members, self.gpus)

    def replicas_on(self, node: dict[str, float]) -> int:
        """How many replicas a node's GPUs hold (its CPUs for a CPU job): floor(GPUs ÷ GPUs a replica)."""
        if not self.gpus:
            return int(node.get("CPU", 0) // self.num_cpus)
        return int(node.get("GPU", 0) // self.gpus)

    def line(self, replicas: int) -> str:
        """The placement line shown at job start: replicas × GPUs, actors per GPU, where the model sits."""
        counted = f"{replicas} replica{'s' if replicas != 1 else ''}"
        actors = f"{replicas} actor{'s' if replicas != 1 else ''}"
        if not self.gpus:
            return f"placement: {actors} on CPU ({self.num_cpus:g} CPU each); a whole model each"
        if self.members > 1:
            return (
                f"placement: {counted} × {self.members} GPUs (gang of {self.members}), 1 actor per "
                "GPU; components: the whole model on each GPU of a gang, each image's work split across "
                "them (model.parallel: context), rank 0 reads and writes the shard"
            )
        if self.gpus > 1:
            return (
                f"placement: {counted} × {self.gpus:g} GPUs, 1 actor per replica; components: "
                f"spread over its {self.gpus:g} GPUs (model.parallel: components)"
            )
        if self.gpus < 1:
            return (
                f"placement: {actors} on {math.ceil(replicas * self.gpus)} GPUs ({self.gpus:g} GPU "
                f"each, {round(1 / self.gpus)} per GPU); components: the whole model in each actor's share"
            )
        return f"placement: {actors} × 1 GPU; components: the whole model on each GPU"


def replica_plan(num_cpus: float, uses_gpu: bool, gpus_per_worker: float, parallel: str) -> ReplicaPlan:
    """The replica `workers.gpus_per_worker` and `model.parallel` ask for (CPU jobs: one CPU actor)."""
    if not uses_gpu:
        return ReplicaPlan(num_cpus, 0)
    if (members := gang_size(gpus_per_worker, parallel)) > 1:
        return ReplicaPlan(num_cpus, 1, members)
    return ReplicaPlan(num_cpus, gpus_per_worker)


def replicas_in_cluster(plan: ReplicaPlan) -> int:
    """Replicas the cluster's nodes hold now, each node on its own (a replica never spans two): at
    least 1, so a cluster that can grow is asked for one."""
    return max(1, sum(plan.replicas_on(node) for node in _node_resources()))


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
    largest = max((node.get("GPU", 0) for node in nodes), default=0)
    if demand.num_gpus > 1 and 0 < largest < demand.num_gpus:
        return (
            f"workers.gpus_per_worker: {demand.num_gpus:g} but no node has {demand.num_gpus:g} GPUs; largest "
            f"has {largest:g}: lower it or add a node with {demand.num_gpus:g}"
        )
    if demand.num_gpus and largest < demand.num_gpus:
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
