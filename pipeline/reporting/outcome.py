"""A job's verdict from its counts: one rule for the runner (exit status, `_SUCCESS`, `_job.json`) and
`imagemill status`, so the two never disagree.

A job is complete when every shard is done and it generated something. One whose every row is an
error (a size no row can have, a column of bad values) made nothing: a nightly run of it must not
report success, and running it again changes nothing, so it is `failed`, not `incomplete`.
"""

from __future__ import annotations

COMPLETE = "complete"
INCOMPLETE = "incomplete"  # shards left to run or failed: running the same command again retries them
NOTHING_GENERATED = "failed: no row generated"
# Stopped by Ctrl-C or SIGTERM (`ray job stop`, a pod's deletion): the record says when; a re-run resumes.
INTERRUPTED = "interrupted"
# workers.max_gpu_hours / max_cost_usd reached with shards left (imagemill.execution.budget): raise it
# and re-run.
BUDGET_REACHED = "stopped: budget reached"


def job_state(shards_done: int, shards_total: int, rows_done: int, generated: int) -> str:
    """`generated`: rows done with an image drawn (ok, filtered by its score, flagged by the safety
    classifier)."""
    if shards_done < shards_total:
        return INCOMPLETE
    if rows_done and not generated:
        return NOTHING_GENERATED
    return COMPLETE
