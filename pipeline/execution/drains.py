"""Nodes being drained: a spot node's preemption notice, a KubeRay scale-down, `ray drain-node`.

Whoever is about to take a node away (the cloud's spot handler through KubeRay or Ray's autoscaler, or
an operator) tells Ray's GCS first, with a deadline: from then on Ray places no new actor or task on
the node, and the node goes at the deadline (or as soon as it is idle). A driver learns of it only by
asking: the GCS answers which nodes are draining and each one's deadline in a single call, cheap enough
to ask every few seconds, never per shard. The reason given with the drain (preemption, idle
termination, its message) is not in that answer, nor anywhere a driver can read it, until the node is
gone (Ray 2.60), so the scheduler's line says only that the node is going and when.

A node with nothing running is released at once, and a node leaves the draining list when it goes: a
drain can come and go between two questions. The driver's own node is such a node (a driver is no
work to Ray), and its going kills every actor the driver owns. So after a worker dies the scheduler
also asks for nodes that went after a drain (the node table, with the drain's reason).

This module is the one place that asks; the scheduler (imagemill.execution.scheduler) decides what a
drain does to its actors and shards.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import ray

DRAIN_CHECK_SECONDS = 2.0  # how often the GCS is asked: a notice gives 30-120 s
DRAINED_AWAY = (3, 4)  # a gone node's DeathReason (NodeDeathInfo): AUTOSCALER_DRAIN_PREEMPTED, _IDLE


@dataclass(frozen=True)
class Drain:
    """A node Ray was told will go, and when (`deadline`: seconds since the epoch; None: no deadline)."""

    node_id: str
    deadline: float | None

    @property
    def short(self) -> str:
        """The node id as `ray status` and the dashboard abbreviate it."""
        return self.node_id[:8]

    def seconds_left(self) -> float:
        """Seconds until the node goes (0 when the deadline is past; infinite without one)."""
        return math.inf if self.deadline is None else max(0.0, self.deadline - time.time())

    def when(self) -> str:
        """The deadline as the log line says it."""
        if self.deadline is None:
            return "no deadline"
        left = self.seconds_left()
        return f"deadline in {left:.0f} s" if left else "deadline already past"


def draining_nodes() -> dict[str, float | None]:
    """The GCS's answer: each draining node's hex id → its deadline (seconds since the epoch, or None)."""
    answer = ray._private.state.state.get_draining_nodes()  # hex id → deadline in ms, 0: none
    return {node_id: (ms / 1000 if ms else None) for node_id, ms in answer.items()}


def drained_away() -> dict[str, float | None]:
    """Nodes gone after a drain (their deadline: now, past), from the GCS's node table."""
    now = time.time()
    return {
        node["NodeID"]: now
        for node in ray.nodes()
        if not node["Alive"] and node["DeathReason"] in DRAINED_AWAY
    }


class DrainWatch:
    """Which nodes are draining, asked of the GCS at most every `every` seconds; remembers every drain
    it saw for the run (a drained node stays drained after it is gone from the GCS's answer)."""

    def __init__(
        self,
        every: float = DRAIN_CHECK_SECONDS,
        ask: Callable[[], dict[str, float | None]] = draining_nodes,
        ask_gone: Callable[[], dict[str, float | None]] = drained_away,
    ):
        self.every = every
        self.ask = ask
        self.ask_gone = ask_gone
        self.next_check = 0.0
        self.seen: dict[str, Drain] = {}

    def due(self) -> bool:
        """Whether it is time to ask the GCS again (then `new_drains` asks)."""
        return time.monotonic() >= self.next_check

    def new_drains(self, gone_too: bool = False) -> list[Drain]:
        """Ask the GCS (`gone_too`: also for nodes already gone after a drain); the drains not seen before."""
        self.next_check = time.monotonic() + self.every
        answer = {**self.ask_gone(), **self.ask()} if gone_too else self.ask()
        new = [Drain(node_id, deadline) for node_id, deadline in answer.items() if node_id not in self.seen]
        self.seen.update((drain.node_id, drain) for drain in new)
        return new

    def of(self, node_id: str | None) -> Drain | None:
        """The drain of `node_id`, if it was seen draining."""
        return self.seen.get(node_id) if node_id else None
