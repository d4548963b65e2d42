"""`imagemill status OUTPUT`: a job's progress read from its output alone, so it works from anywhere."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from imagemill.core.cost import JobCost
from imagemill.core.device_ledger import read_ledger
from imagemill.core.errors import ImagemillError, shown
from imagemill.core.job_record import JobRecord, read_job_record
from imagemill.core.labels import label_lines
from imagemill.core.layout import JOB_RECORD, SUBMITTED, OutputLayout
from imagemill.core.lease import LeaseView, read_lease
from imagemill.core.records import ShardTotals, committed_shards, shard_totals
from imagemill.planning.inputs import counted
from imagemill.reporting.outcome import (
    BUDGET_REACHED,
    COMPLETE,
    INCOMPLETE,
    INTERRUPTED,
    NOTHING_GENERATED,
    job_state,
)

RUNNING = "running"
SUBMITTED_STATE = "submitted, not started"
# `imagemill status`'s exit status, one per state, so a script can branch on it without parsing text
# (docs/running.md has the table). 2 stays the CLI's "a problem with the command" (no job found).
# A run that died without writing its end (its heartbeat stopped) counts as interrupted: both resume.
STATUS_EXIT_CODES = {
    COMPLETE: 0,
    INCOMPLETE: 1,
    BUDGET_REACHED: 3,
    NOTHING_GENERATED: 4,
    RUNNING: 5,
    INTERRUPTED: 6,
    SUBMITTED_STATE: 7,
}


@dataclass
class JobStatus:
    output: str
    record: JobRecord
    shards_done: int
    totals: ShardTotals  # summed over the shards that count
    lease: LeaseView | None = None  # the run holding the output now, if any
    cost: JobCost | None = None  # the device-time ledger's totals (imagemill.core.device_ledger)

    @property
    def rows_done(self) -> int:
        return self.totals.rows

    @property
    def ok(self) -> int:
        return self.totals.ok

    @property
    def filtered(self) -> int:
        return self.totals.filtered

    @property
    def errors_by_reason(self) -> dict[str, int]:
        return self.totals.errors_by_reason

    @property
    def state(self) -> str:
        """What the counts say (imagemill.reporting.outcome), as the runner decides it: only complete
        succeeded."""
        generated = self.ok + self.filtered + self.totals.flagged
        return job_state(self.shards_done, self.record.shards_total, self.rows_done, generated)

    @property
    def phase(self) -> str:
        """Where the job is now, a key of STATUS_EXIT_CODES: running while a live run holds the output,
        interrupted when the run on record stopped or died, else what the counts say."""
        status = self.record.status
        if status == RUNNING:
            return RUNNING if self._held_live() else INTERRUPTED
        if status in (INTERRUPTED, BUDGET_REACHED):
            return status
        return self.state

    @property
    def exit_status(self) -> int:
        return STATUS_EXIT_CODES[self.phase]

    def _held_live(self) -> bool:
        return self.lease is not None and not (self.lease.stale or self.lease.dead)

    def text(self) -> str:
        errors = sum(self.errors_by_reason.values())
        lines = [
            f"job {shown(self.record.name)} at {self.output}: {self._state()}"
            f" (started {self.record.started_at}, ended {self.record.ended_at or '-'})",
            *self._live_lines(),
            f"shards: {self.shards_done}/{self.record.shards_total} done",
            f"rows:   {self.rows_done}/{self.record.rows_total} done: {self.ok} ok, "
            + (f"{self.filtered} filtered, " if self.filtered else "")
            + (f"{self.totals.flagged} flagged, " if self.totals.flagged else "")
            + f"{errors} error",
        ]
        lines += [f"  {reason}: {count}" for reason, count in sorted(self.errors_by_reason.items())]
        if self.cost is not None and self.cost.device_seconds:
            lines.append(f"cost:   {self.cost.text()}")
        lines += [
            f"  failed shard {failure.shard_id}: {failure.error}" for failure in self.record.failed_shards
        ]
        if self.totals.labels:
            lines += ["labels:", *(f"  {line}" for line in label_lines(self.totals.labels))]
        return "\n".join(lines)

    def _live_lines(self) -> list[str]:
        """While a live run holds the output: its progress at its last heartbeat, images drawn in the
        shards still running included (the lines below count committed shards only)."""
        if self.record.status != RUNNING or not self._held_live():
            return []
        live = self.lease.progress
        if live is None:
            return []
        loading = f", loading the model on {live.workers_loading}" if live.workers_loading else ""
        return [
            f"images: {live.images_done}/{live.images_total} done now, {live.shards_done}/"
            f"{live.shards_total} shards committed; workers: {live.workers_ready} ready{loading}"
            f" (heartbeat {self.lease.age:.0f} s ago)"
        ]

    def _state(self) -> str:
        """The record's status, or, while a run is on record as running, how its heartbeat looks."""
        status = self.record.status
        if status != RUNNING:
            return status
        if self.lease is None:
            return "stopped (no live run holds the output)"
        if self.lease.stale or self.lease.dead:
            age = self.lease.age
            return (
                f"stopped (last seen {age:.0f} s ago)"
                if age < 120
                else f"stopped (last seen {age / 60:.0f} min ago)"
            )
        return f"running (heartbeat {self.lease.age:.0f} s ago)"


@dataclass
class NotStarted:
    """An output whose job has no record yet, a normal state and not an error: submitted by `imagemill
    submit` and not started, or started and loading the model (a live run holds the lease)."""

    line: str
    phase: str = SUBMITTED_STATE

    def text(self) -> str:
        return self.line

    @property
    def exit_status(self) -> int:
        return STATUS_EXIT_CODES[self.phase]


def job_status(url: str, storage_options: dict[str, Any] | None = None) -> JobStatus | NotStarted:
    """The job at `url` as its output says; no job there at all is an ImagemillError."""
    output = OutputLayout(url.rstrip("/"), storage_options)
    record = read_job_record(output, warn=False)
    if record is None:
        return _not_started(output, url)
    shards = counted(record, committed_shards(output))  # not those of input files gone since
    cost = read_ledger(output, shards).totals()
    return JobStatus(url, record, len(shards), shard_totals(shards), read_lease(output), cost)


def _not_started(output: OutputLayout, url: str) -> NotStarted:
    """An output without a job record: a run loading the model (the record is written once a worker
    is ready; the lease's heartbeat says how many load), a job submitted that has not started yet
    (`imagemill submit` leaves `_submitted.json`), or no job at all (an ImagemillError)."""
    lease = read_lease(output)
    if lease is not None and not (lease.stale or lease.dead):
        live = lease.progress
        loading = f" on {live.workers_loading} workers" if live and live.workers_loading else ""
        return NotStarted(
            f"job {shown(lease.job)} at {url}: starting, loading the model{loading} (heartbeat "
            f"{lease.age:.0f} s ago); no image yet",
            phase=RUNNING,
        )
    submitted = output.read_json(SUBMITTED)
    if submitted is None:
        raise ImagemillError(f"no imagemill job found at {url} (it has no readable {JOB_RECORD})")
    return NotStarted(
        f"job {shown(submitted.get('name'))} at {url}: submitted, not started (Ray job "
        f"{shown(submitted.get('submission_id'))} at {shown(submitted.get('address'))}, "
        f"{shown(submitted.get('submitted_at'))};"
        f" `ray job status` there says where it is)"
    )
