"""A job's shards through one `ShardWorker` in this process: the in-process shard executor.

For tests of features whose behaviour lives in the worker and the records (not in scheduling), and for
bench/gpu.sh, whose GPU machine has no Ray cluster. `run_in_process` is the real driver
(`imagemill.run`: planning, the lease and claim, resume, `_job.json`, the report) with this executor;
`load_worker` and `run_shards` are the worker alone (no lease, claim or job record) for the bench.
Either way the worker, its generator, writers and stage timer run exactly as in an actor, two shard
calls at a time as the scheduler gives them (`max_concurrency=2`), no shard started once the budget is
reached. Pieces of row groups are read by each shard from their row group (no `PieceServer`).
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import torch

from imagemill.core.device_ledger import AttemptFailed, FailedAttempt
from imagemill.core.records import ShardStats
from imagemill.core.shard import Shard
from imagemill.core.spec import JobSpec
from imagemill.execution.budget import Budget
from imagemill.execution.executor import Live, ShardWork
from imagemill.execution.progress import poll_seconds
from imagemill.execution.runner import JobResult, run
from imagemill.execution.scheduler import SHARDS_PER_ACTOR
from imagemill.planning.auto_cut import auto_rows_per_shard
from imagemill.planning.shards import plan_shards
from imagemill.workers.worker import ShardWorker


def load_worker(
    spec: JobSpec, run_id: str | None = None, on_batch: Callable[[str, int], None] | None = None
) -> ShardWorker:
    """The job's worker, loaded; a load error raised here, as `ready()` raises it to the driver."""
    worker = ShardWorker(spec, run_id=run_id, on_batch=on_batch)
    worker.ready()
    return worker


def _run_on(
    worker: ShardWorker,
    shards: list[Shard],
    on_committed: Callable[[ShardStats], None],
    budget: Budget | None = None,
    on_attempt_failed: Callable[[str, FailedAttempt], None] | None = None,
    run_id: str = "in-process",
    report: Callable[[], None] = lambda: None,
    check: Callable[[], None] = lambda: None,
) -> None:
    """The shards on `worker`, SHARDS_PER_ACTOR calls at a time in plan order, none started once
    `budget` is reached or after `check` raises (the run lost its output's lease), as the scheduler
    feeds an actor; an error in a shard is raised here, as the shard raised it, once
    `on_attempt_failed` has its device time. `report` is called at least every `poll_seconds()` while
    shards run."""
    queue = deque(shards)
    running: dict[Future[ShardStats], Shard] = {}
    with ThreadPoolExecutor(SHARDS_PER_ACTOR) as calls:
        while True:
            if queue:
                check()
            while queue and len(running) < SHARDS_PER_ACTOR and not (budget and budget.reached()):
                shard = queue.popleft()
                running[calls.submit(worker.process_shard, shard)] = shard
            if not running:
                return
            done, _ = wait(running, timeout=poll_seconds(), return_when=FIRST_COMPLETED)
            report()
            for call in done:
                shard = running.pop(call)
                try:
                    stats = call.result()
                except AttemptFailed as failed:
                    if on_attempt_failed is not None:
                        on_attempt_failed(shard.shard_id, _failed_attempt(failed, run_id))
                    raise failed.__cause__ or failed from None
                on_committed(stats)


def _failed_attempt(failed: AttemptFailed, run_id: str) -> FailedAttempt:
    """The ledger's record of an in-process attempt that failed: its one try in the run."""
    return FailedAttempt(
        run_id=run_id,
        attempt=1,
        ended_at=datetime.now(UTC).isoformat(),
        error=f"{failed.error_type}: {failed.message}",
        reported=True,
        charge=failed.charge,
    )


def run_shards(worker: ShardWorker) -> list[ShardStats]:
    """Every shard of the worker's job, in plan order, two calls at a time; their stats by commit."""
    stats: list[ShardStats] = []
    cut = partial(auto_rows_per_shard, workers=1, batch_size=worker.spec.workers.batch_size)
    _run_on(worker, plan_shards(worker.spec.input, cut).shards, stats.append)
    return stats


class InThisProcess:
    """The in-process shard executor (imagemill.execution.executor): one worker, loaded before any
    shard as an actor is; a shard that fails is raised, not retried, its device time recorded first.
    Progress as the scheduler reports it: loading, then the rows drawn in each running shard (a dict
    the worker's threads set)."""

    def __call__(self, work: ShardWork) -> None:
        drawn: dict[str, int] = {}
        work.on_progress(Live(workers_loading=1, workers_ready=0))
        worker = load_worker(work.spec, work.output.run_id, drawn.__setitem__)
        work.on_ready(worker.spec)

        def committed(stats: ShardStats) -> None:
            drawn.pop(stats.shard_id, None)
            work.on_committed(stats)

        def report() -> None:
            work.on_progress(Live(workers_loading=0, workers_ready=1, drawn=dict(drawn)))

        _run_on(
            worker,
            work.shards,
            committed,
            work.budget,
            work.on_attempt_failed,
            work.output.run_id or "in-process",
            report,
            work.output.check,
        )

    def workers(self, spec: JobSpec) -> int:
        return 1


run_in_this_process = InThisProcess()


@contextmanager
def _one_thread() -> Iterator[None]:
    """Torch on one thread, as in an actor with `num_cpus_per_worker: 1`: the images are then the
    bytes a Ray run of the same spec writes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_in_process(spec: JobSpec, **options: Any) -> JobResult:
    """`imagemill.run(spec, **options)` with its shards in this process, on one torch thread."""
    with _one_thread():
        return run(spec, progress=False, executor=run_in_this_process, **options)


def output_hashes(output: Path) -> dict[str, str]:
    """sha256 of every image and metadata file of a local `files` output, by path: equal for two runs
    that wrote the same bytes."""
    return {
        str(path.relative_to(output)): hashlib.sha256(path.read_bytes()).hexdigest()
        for folder in ("images", "metadata")
        for path in sorted((output / folder).rglob("*"))
        if path.is_file()
    }
