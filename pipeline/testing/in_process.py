"""A job's shards through one `ShardWorker` in this process: the in-process shard executor.

For tests of features whose behaviour lives in the worker and the records (not in scheduling), and for
bench/gpu.sh, whose GPU machine has no Ray cluster. `run_in_process` is the real driver
(`imagemill.run`: planning, the lease and claim, resume, `_job.json`, the report) with this executor;
`load_worker` and `run_shards` are the worker alone (no lease, claim or job record) for the bench.
Either way the worker, its generator, writers and stage timer run exactly as in an actor, two shard
calls at a time as the scheduler gives them (`max_concurrency=2`), no shard started once the budget is
reached. Inputs must not need a `PieceServer` (keep row groups at most `rows_per_shard` rows).
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from imagemill.core.records import ShardStats
from imagemill.core.shard import Shard
from imagemill.core.spec import JobSpec
from imagemill.execution.budget import Budget
from imagemill.execution.executor import ShardWork
from imagemill.execution.runner import JobResult, run
from imagemill.execution.scheduler import SHARDS_PER_ACTOR
from imagemill.planning.shards import plan_shards
from imagemill.workers.worker import ShardWorker


def load_worker(spec: JobSpec, run_id: str | None = None) -> ShardWorker:
    """The job's worker, loaded; a load error raised here, as `ready()` raises it to the driver."""
    worker = ShardWorker(spec, run_id=run_id)
    worker.ready()
    return worker


def _run_on(
    worker: ShardWorker,
    shards: list[Shard],
    on_committed: Callable[[ShardStats], None],
    budget: Budget | None = None,
    check: Callable[[], None] = lambda: None,
) -> None:
    """The shards on `worker`, SHARDS_PER_ACTOR calls at a time in plan order, none started once
    `budget` is reached or after `check` raises (the run lost its output's lease), as the scheduler
    feeds an actor; an error in a shard is raised here."""
    if any(shard.row_offset is not None for shard in shards):
        raise ValueError("in-process runs take whole row groups only: write smaller row groups")
    queue = deque(shards)
    running: set[Future[ShardStats]] = set()
    with ThreadPoolExecutor(SHARDS_PER_ACTOR) as calls:
        while True:
            if queue:
                check()
            while queue and len(running) < SHARDS_PER_ACTOR and not (budget and budget.reached()):
                running.add(calls.submit(worker.process_shard, queue.popleft()))
            if not running:
                return
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for call in done:
                on_committed(call.result())


def run_shards(worker: ShardWorker) -> list[ShardStats]:
    """Every shard of the worker's job, in plan order, two calls at a time; their stats by commit."""
    stats: list[ShardStats] = []
    _run_on(worker, plan_shards(worker.spec.input).shards, stats.append)
    return stats


def run_in_this_process(work: ShardWork) -> None:
    """The in-process shard executor (imagemill.execution.executor): one worker, loaded before any
    shard as an actor is; a shard that fails is raised, not retried."""
    worker = load_worker(work.spec, run_id=work.output.run_id)
    work.on_ready(worker.spec)
    _run_on(worker, work.shards, work.on_committed, work.budget, work.output.check)


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
