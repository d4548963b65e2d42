"""`imagemill.run(spec)`: the whole job, from the driver's side.

Plan shards from the input's footers, skip shards the output already holds, run the rest on the
actor pool with a progress bar, and write the job record and the completion marker. The driver sees
shard descriptors and per-shard stats only.
"""

from __future__ import annotations

import logging
import platform
import signal
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import cache
from importlib import metadata

from imagemill.core.compile_cache_key import check_compile_cache_key
from imagemill.core.cost import JobCost
from imagemill.core.device_ledger import DeviceLedger, FailedAttempt, read_ledger, record_failed_attempt
from imagemill.core.job_record import (
    FailedShard,
    JobCostRecord,
    JobRecord,
    read_job_record,
    write_job_record,
)
from imagemill.core.layout import SUCCESS_MARKER, OutputLayout
from imagemill.core.lease import OutputLease
from imagemill.core.model_source import check_sources
from imagemill.core.records import ShardStats, committed_shards, shard_totals
from imagemill.core.schedulers import check_scheduler
from imagemill.core.shard import ShardPlan
from imagemill.core.spec import JobSpec
from imagemill.core.write_gate import OwnedOutput, ShardConflict
from imagemill.execution.budget import Budget
from imagemill.execution.executor import ShardExecutor, ShardFailure, ShardWork
from imagemill.execution.progress import RunProgressTracker, progress_display, progress_seconds
from imagemill.execution.scheduler import run_on_ray
from imagemill.output.claim import claim_output, clear_unfinished
from imagemill.output.location import check_output_location
from imagemill.planning.auto_batch import with_recorded_batch_size
from imagemill.planning.auto_cut import auto_rows_per_shard, recorded_rows_per_shard
from imagemill.planning.image_listing import plan_listing, write_listing
from imagemill.planning.inputs import reconcile_inputs
from imagemill.planning.shards import plan_shards, resume_whole_group_shards
from imagemill.reporting.outcome import BUDGET_REACHED, COMPLETE, INTERRUPTED, NOTHING_GENERATED, job_state
from imagemill.reporting.report import write_report

log = logging.getLogger(__name__)
VERSIONED_PACKAGES = ("imagemill", "torch", "diffusers", "transformers", "ray", "pyarrow", "fsspec", "s3fs")


@dataclass
class JobResult:
    output: str
    shards_total: int
    shards_done: int
    shards_run: int  # by this run; the others were committed before it
    rows_total: int
    ok: int
    errors: int
    errors_by_reason: dict[str, int]
    seconds: float
    failures: list[ShardFailure] = field(default_factory=list)
    filtered: int = 0  # rows done but scored below scoring.threshold
    flagged: int = 0  # rows done but flagged by the safety classifier
    watermark_unreadable: int = 0  # images written whose watermark did not read back
    rows_run: int = 0  # images made by this run (the rate counts these)
    cost: JobCost | None = None  # device time and cost of every attempt (imagemill.core.device_ledger)
    budget_stop: str | None = (
        None  # the limit that stopped the job with shards left (imagemill.execution.budget)
    )

    @property
    def complete(self) -> bool:
        return self.shards_done == self.shards_total

    @property
    def state(self) -> str:
        """complete, incomplete, budget reached or failed (imagemill.reporting.outcome); only complete is a
        success."""
        if self.budget_stop and not self.complete:
            return BUDGET_REACHED
        generated = self.ok + self.filtered + self.flagged
        return job_state(self.shards_done, self.shards_total, generated + self.errors, generated)

    def _timing(self) -> str:
        """This run's time and rate, or that it had nothing to do (a rate would then be noise)."""
        if self.shards_run == 0 and not self.failures and self.complete:
            return f"nothing to do: all {self.shards_total} shards were already done"
        rate = self.rows_run / self.seconds if self.seconds else 0.0
        return f"{self.seconds:.1f} s ({rate:.1f} images/s)"

    def summary(self) -> str:
        filtered = f"{self.filtered} filtered, " if self.filtered else ""
        flagged = f"{self.flagged} flagged, " if self.flagged else ""
        lines = [
            f"{self.rows_total} rows: {self.ok} ok, {filtered}{flagged}{self.errors} error "
            f"in {self.shards_done}/{self.shards_total} shards ({self.shards_run} run now), "
            f"{self._timing()} → {self.output}"
        ]
        lines += [
            f"  error rows, {reason}: {count}" for reason, count in sorted(self.errors_by_reason.items())
        ]
        if self.watermark_unreadable:
            lines.append(
                f"  watermark did not read back from {self.watermark_unreadable} images "
                "(watermark_ok false in the metadata)"
            )
        lines += [
            f"  FAILED shard {f.shard_id} ({f.input_file}) after {f.attempts} tries: {f.error}"
            for f in self.failures
        ]
        if self.cost is not None and self.cost.cost_usd is not None:
            lines.append(f"  cost: {self.cost.text()}")
        if self.failures:
            lines.append("  run the same command again to retry the failed shards; committed shards are kept")
        if self.state == BUDGET_REACHED:
            setting = self.budget_stop.split("=", 1)[0]
            lines.append(
                f"  {BUDGET_REACHED}: {self.budget_stop}, {self.shards_total - self.shards_done} shards not "
                f"done; raise it (--set {setting}=...) and run the same command again to resume"
            )
        if self.state == NOTHING_GENERATED:
            lines.append(f"  {NOTHING_GENERATED}: every row is an error (reasons above); the job failed")
        return "\n".join(lines)


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def run(
    spec: JobSpec,
    progress: bool = True,
    overwrite: bool = False,
    redo_changed: bool = False,
    executor: ShardExecutor = run_on_ray,
) -> JobResult:
    """Run the job to completion; returns the counts.

    Shards already committed in the output are kept, so running the same spec again resumes it.
    `overwrite` deletes a previous job's output first (only imagemill's own files); `redo_changed`
    generates again the shards of input files that changed since they were made (imagemill.planning.inputs).
    `executor` runs the shards left (imagemill.execution.executor): Ray actors unless a caller (tests,
    the bench) runs them in its own process.
    """
    started = time.time()
    check_sources(spec)  # before planning, which may join the cluster to count its workers
    check_scheduler(spec.model.scheduler)
    check_compile_cache_key(spec.speed)
    progress_seconds()  # a bad IMAGEMILL_PROGRESS_SECONDS stops the job before Ray starts
    output = OutputLayout(spec.output.path, spec.output.storage_options)
    spec, plan = _planned(spec, output, overwrite, executor)
    check_output_location(spec, plan)  # before the lease, which creates the output folder
    with OutputLease.held(output, spec.name) as lease:
        return _run_owned(spec, plan, output, lease, started, progress, overwrite, redo_changed, executor)


def _planned(
    spec: JobSpec, output: OutputLayout, overwrite: bool, executor: ShardExecutor
) -> tuple[JobSpec, ShardPlan]:
    """The shard plan, and the spec with `rows_per_shard: auto` resolved to the number it was cut by:
    the output's recorded cut on a resume, else imagemill.planning.auto_cut's for the workers the
    executor would run (read before the lease; the claim then compares the fingerprints under it)."""
    recorded = recorded_rows_per_shard(spec, output, overwrite)
    if recorded is not None:
        spec = spec.with_rows_per_shard(recorded)

    @cache
    def workers() -> int:  # asked only for `auto`: it may join the cluster to count them
        return executor.workers(spec)

    def cut(rows: int) -> int:
        return auto_rows_per_shard(rows, workers(), spec.workers.batch_size)

    listing = plan_listing(spec.input, output, overwrite) if spec.input.format == "images" else None
    plan = plan_shards(spec.input, cut, workers, listing)
    return spec.with_rows_per_shard(plan.rows_per_shard), plan


def _run_owned(
    spec: JobSpec,
    plan: ShardPlan,
    output: OutputLayout,
    lease: OutputLease,
    started: float,
    progress: bool,
    overwrite: bool,
    redo_changed: bool,
    executor: ShardExecutor,
) -> JobResult:
    """The job, run while `lease` makes this run the output's only owner (so --overwrite is safe); every
    write into the output goes through `owned`, which checks that it still is (core/write_gate.py)."""
    owned = OwnedOutput(output, lease.run_id)
    spec = with_recorded_batch_size(spec, output, overwrite)
    claim_output(spec, owned, plan, overwrite)
    write_listing(owned, plan)  # input.format: images: the images no earlier run listed
    owned.clean_staging()  # shard attempts of runs that are gone or were taken over
    stored = committed_shards(output)
    redone = reconcile_inputs(owned, plan, stored, redo_changed)
    plan = resume_whole_group_shards(plan, set(stored) - redone)
    planned = {shard.shard_id for shard in plan.shards} - redone  # redone: deleted just now
    committed = {shard_id: stats for shard_id, stats in stored.items() if shard_id in planned}
    done_before = set(committed)
    # Every attempt's device time, this run's added as they end: what the budget and the cost read.
    ledger = read_ledger(output, committed.values())
    budget = Budget(spec.workers, ledger)
    todo = [shard for shard in plan.shards if shard.shard_id not in committed]
    failures = [
        ShardFailure(bad.shard_id, bad.file_url, attempts=1, error=bad.error) for bad in plan.unreadable
    ]
    shards_total = len(plan.shards) + len(plan.unreadable)
    rows_total = plan.total_rows * spec.images_per_row  # one metadata row per image
    record = JobRecord(
        name=spec.name,
        spec=spec.redacted(),
        fingerprint=spec.fingerprint(),
        versions=_versions(),
        started_at=datetime.now(UTC).isoformat(),
        status="running",
        shards_total=shards_total,
        rows_total=rows_total,
        input_rows=plan.total_rows,
        input_files=len(plan.files),
        input_footers=plan.footers,
        run_id=lease.run_id,
    )

    record_written = False

    def start_record(resolved: JobSpec) -> None:
        """Written once the workers have loaded the model: a job whose model does not load leaves
        the output as it was, so a corrected spec may run there without --overwrite. `resolved`: the
        spec as the run uses it (`workers.batch_size: auto` fixed by the first actor)."""
        nonlocal record_written
        record.fingerprint = resolved.fingerprint()
        record.ready_at = datetime.now(UTC).isoformat()
        previous = read_job_record(output)  # the record this one replaces: its runs go on in this one
        record.runs = previous.carried_runs(committed.values()) if previous else []
        write_job_record(owned, record)
        owned.remove(SUCCESS_MARKER)
        record_written = True  # from now on an interrupted run says so in the record

    def commit(stats: ShardStats) -> None:
        committed[stats.shard_id] = stats
        ledger.add_committed(stats)  # the budget counts it from now on

    def attempt_failed(shard_id: str, attempt: FailedAttempt) -> None:
        record_failed_attempt(owned, shard_id, attempt)  # kept for later runs' budget
        ledger.add_failed(shard_id, attempt)
        if attempt.error.startswith(f"{ShardConflict.__name__}:"):
            # Files at this shard's paths that no commit of this run put there: a run that lost the
            # lease and stalled between its check and its write, or an attempt of this run cut short.
            # This run holds the lease and the shard was uncommitted when it started, so they are
            # nobody's commit: cleared, the retry publishes into free paths.
            log.warning("shard %s: clearing files another attempt left at its paths, to retry", shard_id)
            clear_unfinished(owned, {shard_id})

    def node_drained() -> None:
        record.nodes_drained += 1  # written with the run's end

    try:
        if todo and not budget.reached():
            clear_unfinished(owned, {shard.shard_id for shard in todo})  # only shards it will run
            work = ShardWork(
                spec,
                owned,
                todo,
                budget,
                start_record,
                commit,
                failures.append,
                attempt_failed,
                on_node_drained=node_drained,
            )
            _execute(work, executor, lease, committed, shards_total, rows_total, progress)
        else:  # nothing to run, or the budget was reached by earlier runs
            start_record(spec)
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C; SIGTERM (`ray job stop`, a pod deleted) exits
        # Ray's native SIGTERM handler arms a 3 s SIGALRM abort before Python's handler runs (Ray
        # #64830): an end slower than that (the record and report on a slow store) died as SIGABRT.
        signal.alarm(0)
        if record_written:
            _end_record(owned, lease, record, committed, ledger, failures, INTERRUPTED)
        raise
    result = _result(spec, committed, ledger, failures, shards_total, rows_total, started, done_before)
    result.budget_stop = budget.reached()
    if spec.evaluation is not None and committed:
        # Imported here: the post-pass needs torch, which would add 2 s to every `imagemill` start.
        from imagemill.evaluation.post_pass import evaluate

        record.evaluation = evaluate(spec, owned, committed)
    owned.clean_staging()  # this run's: its shards are all committed or given up
    _end_record(owned, lease, record, committed, ledger, failures, result.state)
    if result.state == COMPLETE:
        owned.write_whole(SUCCESS_MARKER, b"")
    return result


def _execute(
    work: ShardWork,
    executor: ShardExecutor,
    lease: OutputLease,
    committed: dict[str, ShardStats],
    shards_total: int,
    rows_total: int,
    progress: bool,
) -> None:
    """`work` through `executor`, each committed shard added to `committed` (its `on_committed`) and
    logged; the executor's progress reports and the commits shown on the progress bar or line and
    written into the lease's heartbeat."""
    spec = work.spec
    rows_done = sum(stats.rows for stats in committed.values())
    display = progress_display(spec.name, rows_total, rows_done, progress)

    def on_failed(failure: ShardFailure) -> None:
        work.on_failed(failure)
        tracker.shard_ended(failure.shard_id)

    def on_committed(stats: ShardStats) -> None:
        work.on_committed(stats)
        tracker.shard_ended()
        filtered = f", {stats.filtered} filtered" if spec.scoring else ""
        filtered += f", {stats.flagged} flagged" if spec.safety else ""
        log.info(
            "shard %s done: %d rows, %d ok%s, %d error in %.1f s (%.1f images/s; read %.1f s, "
            "generate %.1f s, waiting on writes %.1f s) [%d/%d shards]",
            stats.shard_id,
            stats.rows,
            stats.ok,
            filtered,
            stats.error,
            stats.seconds,
            stats.images_per_second,
            stats.read_seconds,
            stats.model_seconds,
            stats.write_wait_seconds,
            len(committed),
            shards_total,
        )

    with display as shown:
        tracker = RunProgressTracker(shown, lease, committed, rows_total, shards_total)
        executor(replace(work, on_committed=on_committed, on_failed=on_failed, on_progress=tracker.report))


def _result(
    spec: JobSpec,
    committed: dict[str, ShardStats],
    ledger: DeviceLedger,
    failures: list[ShardFailure],
    shards_total: int,
    rows_total: int,
    started: float,
    done_before: set[str],
) -> JobResult:
    totals = shard_totals(committed.values())
    return JobResult(
        output=spec.output.path,
        shards_total=shards_total,
        shards_done=len(committed),
        shards_run=len(set(committed) - done_before),
        rows_total=rows_total,
        ok=totals.ok,
        errors=totals.errors,
        errors_by_reason=totals.errors_by_reason,
        seconds=time.time() - started,
        failures=failures,
        filtered=totals.filtered,
        flagged=totals.flagged,
        watermark_unreadable=totals.watermark_unreadable,
        cost=ledger.totals(),
        rows_run=sum(stats.rows for shard_id, stats in committed.items() if shard_id not in done_before),
    )


def _end_record(
    output: OwnedOutput,
    lease: OutputLease,
    record: JobRecord,
    committed: dict[str, ShardStats],
    ledger: DeviceLedger,
    failures: list[ShardFailure],
    state: str,
) -> None:
    """The job record's closing counts and how the run ended, then the report from them."""
    totals = shard_totals(committed.values())
    record.ended_at = datetime.now(UTC).isoformat()  # each assignment is validated (StoredRecord)
    record.status = state
    record.shards_done = len(committed)
    record.rows_ok = totals.ok
    record.rows_filtered = totals.filtered
    record.rows_flagged = totals.flagged
    record.rows_watermark_unreadable = totals.watermark_unreadable
    record.rows_error = totals.errors
    record.errors_by_reason = totals.errors_by_reason
    record.failed_shards = [FailedShard(**vars(failure)) for failure in failures]
    record.cost = JobCostRecord(**ledger.totals().to_json())
    lease.confirm()
    write_job_record(output, record)
    write_report(output)
