"""The job record, `_job.json`: what a run of a job was, declared once and read only through its model.

The runner writes it when the workers have loaded the model (`status: running`, the earlier runs
carried over from the record it replaces) and again when the run ends (its counts, failed shards,
cost and evaluation); `status`, the report, claiming the output, input reconciliation and
`workers.batch_size: auto` read it back. It is a StoredRecord
(imagemill.core.records): strict, closed and versioned, so a record of another schema version is
refused in one line by `read_record`, and code outside this module reads attributes, never keys.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pydantic import Field

from imagemill.core.evaluation_results import EvaluationResults
from imagemill.core.layout import JOB_RECORD
from imagemill.core.records import RecordPart, StoredRecord, read_record

if TYPE_CHECKING:
    from imagemill.core.layout import OutputLayout
    from imagemill.core.records import ShardStats
    from imagemill.core.write_gate import OwnedOutput

# How an earlier run ended when its record still said `running`: it was killed (SIGKILL, a lost node)
# before it could say; its end is then its last commit.
KILLED = "killed: no end recorded"


class FailedShard(RecordPart):
    """A shard the run gave up on, with why."""

    shard_id: str
    input_file: str
    attempts: int
    error: str


class RunEntry(RecordPart):
    """One run of the job on this output: the report's runs and its all-run totals read these."""

    run_id: str
    started_at: str  # ISO 8601, UTC, as the fields below
    ready_at: str | None  # when its first worker had loaded the model: start-up ends
    ended_at: str | None
    status: str
    images: int  # ok images in the shards it committed


class JobCostRecord(RecordPart):
    """imagemill.core.cost.JobCost as the record keeps it: the device-time ledger's totals when the run
    ended (imagemill.core.device_ledger: every attempt, committed or failed, of every run)."""

    device_seconds: float
    device_kinds: list[str]
    cost_usd: float | None
    usd_per_1000_images: float | None
    unpriced_device_seconds: float
    images: int
    failed_attempts: int
    failed_device_seconds: float


class JobRecord(StoredRecord):
    """`_job.json`. The closing fields are None (or empty) while the run is on record as running."""

    name: str
    spec: dict[str, Any]  # JobSpec.redacted(): every storage option hidden
    fingerprint: dict[str, Any]  # JobSpec.fingerprint() of the spec as run (batch_size: auto resolved)
    versions: dict[str, str]  # python and the packages that decide the output's bytes
    started_at: str  # ISO 8601, UTC
    status: str  # running, or how the run ended (imagemill.reporting.outcome)
    shards_total: int
    rows_total: int  # metadata rows planned: input rows × images per row
    input_rows: int
    input_files: int
    input_footers: dict[str, str]  # input file URL → its footer's digest (imagemill.planning.inputs)
    run_id: str  # the run that holds the output's lease (imagemill.core.lease)
    ready_at: str | None = None  # when this run's first worker had loaded the model
    runs: list[RunEntry] = Field(default_factory=list)  # the earlier runs on this output, oldest first
    ended_at: str | None = None
    shards_done: int | None = None
    rows_ok: int | None = None
    rows_filtered: int | None = None
    rows_flagged: int | None = None
    rows_watermark_unreadable: int | None = None  # output.watermark: images it did not read back from
    rows_error: int | None = None
    errors_by_reason: dict[str, int] = Field(default_factory=dict)
    failed_shards: list[FailedShard] = Field(default_factory=list)
    cost: JobCostRecord | None = None
    # Nodes this run saw being drained (a preemption notice; imagemill.execution.drains): their shards
    # were handed back without a try counted.
    nodes_drained: int = 0
    # imagemill.evaluation.post_pass's results (core/evaluation_results.py); None without evaluation:.
    evaluation: EvaluationResults | None = None

    def setting(self, dotted: str) -> Any:
        """A setting of the job's spec as recorded (`scoring.threshold`); None where it or a section
        above it is unset."""
        value: Any = self.spec
        for name in dotted.split("."):
            value = value.get(name) if isinstance(value, dict) else None
        return value

    def all_runs(self, shards: Iterable[ShardStats]) -> list[RunEntry]:
        """The earlier runs and this record's own, its images counted from `shards` (the committed
        shards' stats name the run that committed them)."""
        own = [stats for stats in shards if stats.run_id == self.run_id]
        entry = RunEntry(
            run_id=self.run_id,
            started_at=self.started_at,
            ready_at=self.ready_at,
            ended_at=self.ended_at,
            status=self.status,
            images=sum(stats.ok for stats in own),
        )
        return [*self.runs, entry]

    def carried_runs(self, shards: Iterable[ShardStats]) -> list[RunEntry]:
        """The runs the next run's record carries on: all_runs, where this record's run, if it is
        still `running` (the next run holds the lease, so it is not), was killed and ended at its
        last commit (or, with none, when it was ready)."""
        shards = list(shards)
        *earlier, own = self.all_runs(shards)
        if own.status == "running":
            commits = [s.finished_at for s in shards if s.run_id == self.run_id and s.finished_at]
            ended = max(commits, key=datetime.fromisoformat, default=self.ready_at)
            own = own.model_copy(update={"status": KILLED, "ended_at": ended})
        return [*earlier, own]

    @property
    def batch_size(self) -> int | None:
        """The batch size the run used (a number, also for `auto`), or None where none is recorded."""
        recorded = self.fingerprint.get("workers", {}).get("batch_size")
        return recorded if type(recorded) is int and recorded > 0 else None

    @property
    def rows_per_shard(self) -> int | None:
        """The rows per shard the job was cut by (a number, also for `auto`), or None where none is
        recorded."""
        recorded = self.fingerprint.get("input", {}).get("rows_per_shard")
        return recorded if type(recorded) is int and recorded > 0 else None


def read_job_record(output: OutputLayout, warn: bool = True) -> JobRecord | None:
    """The job record; None where there is none or it is not a whole job record (with a warning).
    A record of another schema version is refused (imagemill.core.records.OutdatedRecord)."""
    data = output.read_bytes(JOB_RECORD, warn)
    return None if data is None else read_record(JobRecord, output.path(JOB_RECORD), data, warn)


def write_job_record(output: OwnedOutput, record: JobRecord) -> None:
    output.write_whole(JOB_RECORD, record.record_bytes())
