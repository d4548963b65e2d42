"""Input files that changed or went away between runs of a job into the same output.

Each run records every input file's identity in `_job.json` (`input_footers`: file URL → SHA-256 of
its Parquet footer, which planning reads anyway). The footer holds the row groups' row counts, byte
offsets and sizes and, as pyarrow and Spark write by default, each column's min/max statistics, so a
rewrite with other rows changes it; it is the same in every store (an S3 ETag depends on how the
object was uploaded, a local mtime on when), so a byte-identical re-upload is not taken for a change.
A rewrite that keeps every size and statistic the same is not noticed.

On the next run, a file whose footer differs and that has committed shards is refused (its shards
would be kept and its new rows never generated), unless `--redo-changed` deletes those shards so
they are generated again; a file that is gone is reported, and its shards no longer count.
"""

from __future__ import annotations

import logging

from imagemill.core.errors import ImagemillError
from imagemill.core.job_record import JobRecord, read_job_record
from imagemill.core.layout import OutputLayout
from imagemill.core.records import ShardStats
from imagemill.core.shard import ShardPlan
from imagemill.core.write_gate import OwnedOutput
from imagemill.output.claim import delete_shards

log = logging.getLogger(__name__)


def counted(record: JobRecord, stats: dict[str, ShardStats]) -> list[ShardStats]:
    """The committed shards that count toward a job's totals: those of the input files its last run
    planned."""
    return [shard for shard in stats.values() if shard.input_file in record.input_footers]


def reconcile_inputs(
    owned: OwnedOutput, plan: ShardPlan, stored: dict[str, ShardStats], redo_changed: bool
) -> set[str]:
    """Compare the plan's input files with those the previous run recorded; returns the ids of the
    committed shards deleted for `redo_changed`. Refuses a changed file otherwise, in one line."""
    output = owned.layout
    record = read_job_record(output, warn=False)
    previous = record.input_footers if record is not None else {}
    for url in sorted(set(previous) - set(plan.files)):
        log.warning(
            "input file %s is gone since the last run: its shards no longer count toward this job", url
        )
    changed = {url for url, footer in plan.footers.items() if previous.get(url, footer) != footer}
    redo = {shard_id for shard_id, stats in stored.items() if stats.input_file in changed}
    if not redo:
        return set()
    if not redo_changed:
        first = min(stats.input_file for stats in stored.values() if stats.input_file in changed)
        more = f" (and {len(changed) - 1} more files)" if len(changed) > 1 else ""
        raise ImagemillError(
            f"input file {first}{more} changed since this job generated its rows (its Parquet footer "
            "differs); restore it, or run with --redo-changed to generate that file's rows again"
        )
    shard_ids = sorted(redo)
    # uncommitted first: a redo cut short leaves shards to redo, never gaps
    owned.remove_files([OutputLayout.stats_path(shard_id) for shard_id in shard_ids])
    delete_shards(owned, shard_ids, committed=set(shard_ids))
    log.warning("input changed: generating %d shards of %d files again", len(redo), len(changed))
    return redo
