"""A job's shards through one `ShardWorker` in this process: no Ray, no lease, no claim, no job record.

For tests of the actor's own code path and for bench/gpu.sh, whose GPU machine has no Ray: the
worker, its generator, writers and stage timer run exactly as in an actor, two shard calls at a time
as the scheduler gives them (`max_concurrency=2`), on the shards the driver would plan. Inputs must
not need a `PieceServer` (keep row groups at most `rows_per_shard` rows).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from imagemill.core.records import ShardStats
from imagemill.core.spec import JobSpec
from imagemill.planning.shards import plan_shards
from imagemill.workers.worker import ShardWorker

SHARD_CALLS = 2  # concurrent shard calls per actor, as the scheduler runs them


def load_worker(spec: JobSpec) -> ShardWorker:
    """The job's worker, loaded; a load error raised here, as `ready()` raises it to the driver."""
    worker = ShardWorker(spec)
    worker.ready()
    return worker


def run_shards(worker: ShardWorker) -> list[ShardStats]:
    """Every shard of the worker's job, in plan order, two calls at a time; their stats."""
    shards = plan_shards(worker.spec.input).shards
    if any(shard.row_offset is not None for shard in shards):
        raise ValueError("in-process runs take whole row groups only: write smaller row groups")
    with ThreadPoolExecutor(SHARD_CALLS) as calls:
        return list(calls.map(worker.process_shard, shards))
