"""Where a job's shards run, injected into `imagemill.run`: the driver around it (planning, the lease
and claim, resume, the job record, the report) is the same whichever executor runs them.

The default is the Ray actor pool (`imagemill.execution.scheduler.run_on_ray`); tests and the bench run
the same driver with the shards in this process (`imagemill.testing.in_process.run_in_this_process`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from imagemill.core.device_ledger import FailedAttempt
from imagemill.core.records import ShardStats
from imagemill.core.shard import Shard
from imagemill.core.spec import JobSpec
from imagemill.core.write_gate import OwnedOutput
from imagemill.execution.budget import Budget


@dataclass(frozen=True)
class ShardFailure:
    """A shard that failed all its tries (or whose input could not be read): the run ends incomplete."""

    shard_id: str
    input_file: str
    attempts: int
    error: str


@dataclass(frozen=True)
class Live:
    """What an executor knows between commits: workers still loading the model (or not yet placed),
    workers ready, and the images drawn so far in each shard it is running, by shard id (a shard's
    latest count; its committed stats replace it)."""

    workers_loading: int
    workers_ready: int
    drawn: Mapping[str, int] = field(default_factory=dict)


def _ignore(live: Live) -> None:
    """No progress wanted."""


def _not_counted() -> None:
    """No drain count wanted (an executor without nodes never calls it)."""


@dataclass(frozen=True)
class ShardWork:
    """What an executor is given: the shards left of one run and where to report on them.

    `output`: the output as this run holds it (core/write_gate.py): workers write through it, and the
    executor calls its `check()` before it hands out shards, so a run that lost its lease stops at once;
    `on_ready`: call once the model has loaded, before any shard starts, with the spec the run uses
    (`workers.batch_size: auto` resolved); a model that does not load raises instead, leaving no record;
    `on_committed`: each shard's stats once it has committed (the progress bar and log follow it);
    `on_failed`: each shard that failed all its tries;
    `on_attempt_failed`: each attempt that committed nothing, with its device time, before the next
    shard is handed out (the budget counts it: imagemill.core.device_ledger);
    `on_node_drained`: once per node the executor saw being drained (imagemill.execution.drains);
    `on_progress`: a `Live` at least every `imagemill.execution.progress.poll_seconds()` while
    shards run or the model loads (the console's progress lines and the heartbeat's progress);
    `budget`: once it is reached, no further shard is started (imagemill.execution.budget).
    """

    spec: JobSpec
    output: OwnedOutput
    shards: list[Shard]
    budget: Budget
    on_ready: Callable[[JobSpec], None]
    on_committed: Callable[[ShardStats], None]
    on_failed: Callable[[ShardFailure], None]
    on_attempt_failed: Callable[[str, FailedAttempt], None]
    on_progress: Callable[[Live], None] = _ignore
    on_node_drained: Callable[[], None] = _not_counted


class ShardExecutor(Protocol):
    """Runs `work.shards` to the end (committed, failed, or left when the budget is reached) and
    returns once none is running; every outcome goes through `work`'s callbacks."""

    def __call__(self, work: ShardWork) -> None: ...

    def workers(self, spec: JobSpec) -> int:
        """How many workers it would run `spec`'s shards on now: what `rows_per_shard: auto` divides
        the input by (imagemill.planning.auto_cut). Called before planning, after the model check."""
        ...
