"""`input.rows_per_shard: auto` on the driver: a cut that gives every worker work, kept across resumes.

A shard goes to one worker whole, so a job of fewer shards than workers leaves workers idle (and billed):
a 16-row night at the old default of 1,024 rows per shard was one shard on one of two GPUs. `auto` cuts
about SHARDS_PER_WORKER shards per worker, so a slow shard at the end still leaves the others busy,
and never fewer rows than a batch (a shard's batches are cut from it alone, so a small shard makes small
model calls) unless a batch per worker would leave a worker idle; it rounds up to whole batches and
stops at MAX_ROWS, the unit a failure redoes.

The cut decides which rows share a model call (output bytes), so it is in the fingerprint: the number
is recorded in `_job.json` (never `auto`), and a later run with `auto` reads it back here, before
planning, whatever the worker count now. An explicit number is compared as always.
"""

from __future__ import annotations

import math

from imagemill.core.job_record import read_job_record
from imagemill.core.layout import OutputLayout
from imagemill.core.spec import JobSpec

SHARDS_PER_WORKER = 4
MAX_ROWS = 1024  # the old default: past it, more shards only add commits
UNKNOWN_BATCH = 8  # `workers.batch_size: auto` before a worker has probed: the CPU value and the default


def auto_rows_per_shard(rows: int, workers: int, batch_size: int | str) -> int:
    """The rows per shard for `rows` input rows on `workers` workers at `batch_size` images per call."""
    batch = batch_size if isinstance(batch_size, int) else UNKNOWN_BATCH
    per_worker = rows // max(workers, 1)
    floor = min(batch, per_worker)  # a full batch, unless that would leave a worker without a shard
    target = max(floor, math.ceil(rows / (SHARDS_PER_WORKER * max(workers, 1))), 1)
    if target > batch:
        target = math.ceil(target / batch) * batch  # whole batches: no shard ends in a part batch
    return min(target, MAX_ROWS)


def recorded_rows_per_shard(spec: JobSpec, output: OutputLayout, overwrite: bool) -> int | None:
    """The cut the output's job record holds, for a spec with `auto`; None for a numbered spec, a new
    output, or `--overwrite` (which starts the job again and cuts anew)."""
    if spec.input.rows_per_shard != "auto" or overwrite:
        return None
    record = read_job_record(output, warn=False)
    return record.rows_per_shard if record is not None else None
