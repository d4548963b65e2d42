"""The device-time ledger: every attempt of every shard, committed or not, and what its device time cost.

The one place that says what device time counts. A committed attempt's charge is in its shard's
stats (`shards/<shard_id>.json`); a failed attempt's is in `attempts/<shard_id>.json`, written by the
driver when it sees the failure (`record_failed_attempt`, the ledger's only write). The budget
(imagemill.execution.budget), `_job.json`'s cost, the report and `imagemill status` all read their
totals from a `DeviceLedger`, so an attempt that spends device time and fails counts toward
`workers.max_gpu_hours` across re-runs as a committed one does.

What a failed attempt costs:
- one that failed with a report (an error raised in the shard call: a read, a write, the commit)
  costs what the actor measured, as for a commit: the time its device was reserved for the attempt;
- one that died without a report (its actor or node gone) costs the wall-clock its actor's devices
  were held for it: from the later of its hand-out and that actor's last report to when the driver saw
  the death, times the devices the actor holds, at the run's price; the actor's other attempts that
  died with it share that span, so it is charged once.
An attempt in flight when the driver itself is killed is not recorded.

A ledger is a set of entries keyed by attempt: merging two is their union, so pieces merge in any
order and grouping, a piece read twice counts once, and the totals (`math.fsum`, exactly rounded) are
the same whatever the order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import Field

from imagemill.core.cost import DeviceCharge, JobCost
from imagemill.core.records import RecordPart, ShardStats, StoredRecord, capped, read_record

if TYPE_CHECKING:
    from imagemill.core.layout import OutputLayout
    from imagemill.core.write_gate import OwnedOutput


class FailedAttempt(RecordPart):
    """One attempt of a shard that committed nothing, with the device time it spent."""

    run_id: str  # the run that handed it out (imagemill.core.lease)
    attempt: int  # the run's try of this shard: 1, 2, ...
    ended_at: str  # ISO 8601, UTC: when the driver saw it fail
    error: str  # one line, capped
    reported: bool  # False: the actor died without a report, and the driver charged its wall-clock
    charge: DeviceCharge


class ShardAttempts(StoredRecord):
    """`attempts/<shard_id>.json`: a shard's failed attempts, over every run of the output."""

    shard_id: str
    failed: list[FailedAttempt] = Field(default_factory=list)


class AttemptFailed(Exception):
    """Raised by an actor's shard call in place of its error: the error, as one line the driver shows,
    and the attempt's device time (picklable, so it crosses Ray as the task error's cause)."""

    def __init__(self, message: str, error_type: str, charge: DeviceCharge):
        super().__init__(message, error_type, charge)

    @property
    def message(self) -> str:
        return self.args[0]

    @property
    def error_type(self) -> str:
        return self.args[1]

    @property
    def charge(self) -> DeviceCharge:
        return self.args[2]

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class LedgerEntry:
    """One attempt: its key (unique per attempt), its charge, the images it made (a committed one's ok
    and filtered rows), whether it failed."""

    key: tuple[str, ...]
    charge: DeviceCharge | None  # None: a commit of an imagemill before device time, counting nothing
    images: int
    failed: bool

    @classmethod
    def committed(cls, stats: ShardStats) -> LedgerEntry:
        charge = None
        if stats.device_seconds is not None and stats.device_kind is not None:
            charge = DeviceCharge(
                device_seconds=stats.device_seconds,
                device_kind=stats.device_kind,
                accelerator_type=stats.accelerator_type,
                cost_usd=stats.cost_usd,
            )
        return cls(("committed", stats.shard_id), charge, stats.ok + stats.filtered, failed=False)

    @classmethod
    def failed_attempt(cls, shard_id: str, attempt: FailedAttempt) -> LedgerEntry:
        key = ("failed", shard_id, attempt.run_id, str(attempt.attempt))
        return cls(key, attempt.charge, images=0, failed=True)


class DeviceLedger:
    """Every attempt's device time, keyed by attempt; its totals are the job's device time and cost."""

    def __init__(self, entries: Iterable[LedgerEntry] = ()):
        self._entries: dict[tuple[str, ...], LedgerEntry] = {}
        self._totals: JobCost | None = None
        for entry in entries:
            self.add(entry)

    @classmethod
    def of_committed(cls, committed: Iterable[ShardStats]) -> DeviceLedger:
        return cls(LedgerEntry.committed(stats) for stats in committed)

    def add(self, entry: LedgerEntry) -> None:
        """Count an attempt; one already counted (the same key) is counted once."""
        self._entries.setdefault(entry.key, entry)
        self._totals = None

    def add_committed(self, stats: ShardStats) -> None:
        self.add(LedgerEntry.committed(stats))

    def add_failed(self, shard_id: str, attempt: FailedAttempt) -> None:
        self.add(LedgerEntry.failed_attempt(shard_id, attempt))

    def merge(self, other: DeviceLedger) -> DeviceLedger:
        """A ledger of both's attempts (their union)."""
        return DeviceLedger([*self._entries.values(), *other._entries.values()])

    def totals(self) -> JobCost:
        """The device time, cost and images over every attempt (kept until an attempt is added)."""
        if self._totals is None:
            self._totals = _totals(list(self._entries.values()))
        return self._totals


def _totals(entries: list[LedgerEntry]) -> JobCost:
    charged = [entry for entry in entries if entry.charge is not None]
    seconds = [entry.charge.device_seconds for entry in charged]
    prices = [entry.charge.cost_usd for entry in charged if entry.charge.cost_usd is not None]
    failed = [entry for entry in charged if entry.failed]
    return JobCost(
        device_seconds=math.fsum(seconds),
        device_kinds=sorted({entry.charge.device_kind for entry in charged}),
        cost_usd=math.fsum(prices) if prices else None,
        unpriced_device_seconds=math.fsum(
            entry.charge.device_seconds for entry in charged if entry.charge.cost_usd is None
        ),
        images=sum(entry.images for entry in entries),
        failed_attempts=sum(1 for entry in entries if entry.failed),
        failed_device_seconds=math.fsum(entry.charge.device_seconds for entry in failed),
    )


def _stored_attempts(output: OutputLayout) -> list[ShardAttempts]:
    """Every shard's failed attempts on record; a file that is not its shard's record counts nothing
    (with a warning), like a stats file that does not read."""
    found = []
    for name, is_folder in sorted(output.entries("attempts").items()):
        if is_folder or not name.endswith(".json"):
            continue
        shard_id = name.removesuffix(".json")
        relative = output.attempts_path(shard_id)
        data = output.read_bytes(relative)
        record = None if data is None else read_record(ShardAttempts, output.path(relative), data)
        if record is not None and record.shard_id == shard_id:
            found.append(record)
    return found


def attempted_shard_ids(output: OutputLayout) -> set[str]:
    """The shards with failed attempts on record: what `--overwrite` deletes with the job."""
    return {record.shard_id for record in _stored_attempts(output)}


def read_ledger(output: OutputLayout, committed: Iterable[ShardStats]) -> DeviceLedger:
    """The job's ledger: the `committed` shards that count (the caller's: those of the planned input
    files) and every failed attempt on record in the output."""
    ledger = DeviceLedger.of_committed(committed)
    for record in _stored_attempts(output):
        for attempt in record.failed:
            ledger.add_failed(record.shard_id, attempt)
    return ledger


def record_failed_attempt(owned: OwnedOutput, shard_id: str, attempt: FailedAttempt) -> None:
    """Add a failed attempt to its shard's record: the driver's one write of the ledger, made before
    the next shard is handed out, so the budget has counted it."""
    output = owned.layout
    relative = output.attempts_path(shard_id)
    data = output.read_bytes(relative)
    record = None if data is None else read_record(ShardAttempts, output.path(relative), data)
    if record is None or record.shard_id != shard_id:
        record = ShardAttempts(shard_id=shard_id)
    attempt = attempt.model_copy(update={"error": capped(attempt.error)})
    record.failed = [*record.failed, attempt]
    owned.write_whole(relative, record.record_bytes())
