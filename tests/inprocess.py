"""`imagemill.run` with its shards run by one in-process `ShardWorker` instead of Ray actors.

Everything else is the real driver: planning, the lease and claim, resume, `_job.json`, the report.
For features whose behaviour lives in the worker and the records (not in scheduling), this tests them
end to end in seconds. Torch runs on one thread, as in an actor with `num_cpus_per_worker: 1`, so the
images are the bytes a Ray run of the same spec writes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

import imagemill
import imagemill.execution.runner
from imagemill.workers.worker import ShardWorker


@contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _schedule_in_process(
    spec, todo, committed, failures, shards_total, rows_total, lease, start_record, progress, budget
):
    """runner._schedule's contract, served by one ShardWorker in this process, shard after shard, none
    handed out once the budget is reached (as the scheduler does)."""
    worker = ShardWorker(spec, run_id=lease.run_id)
    if worker.load_error is not None:
        raise worker.load_error
    start_record(worker.spec)
    for shard in todo:
        if budget.reached():
            break
        committed[shard.shard_id] = worker.process_shard(shard)


def output_hashes(output: Path) -> dict[str, str]:
    """sha256 of every image and metadata file of a local `files` output, by path: equal for two runs
    that wrote the same bytes."""
    return {
        str(path.relative_to(output)): hashlib.sha256(path.read_bytes()).hexdigest()
        for folder in ("images", "metadata")
        for path in sorted((output / folder).rglob("*"))
        if path.is_file()
    }


def run_in_process(spec: imagemill.JobSpec, **options: Any) -> imagemill.JobResult:
    """`imagemill.run(spec, **options)` without Ray (see the module docstring)."""
    with pytest.MonkeyPatch.context() as patch, _one_thread():
        patch.setattr(imagemill.execution.runner, "_schedule", _schedule_in_process)
        return imagemill.run(spec, progress=False, **options)
