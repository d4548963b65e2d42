"""`workers.batch_size: auto` on the driver: one batch size per job, kept across resumes.

Batch size is in the fingerprint (it decides output bytes), so `auto` may not find a new value on
every run. The first actor to load probes its device (imagemill.workers.batch_fit) and the scheduler
fixes that value for the run; `_job.json`'s fingerprint records the number, not `auto`. A later run
with `auto` reads it back here, before the output is claimed, so its fingerprint matches and its
actors are given the number and probe nothing: the resumed shards are the bytes an unbroken run makes.
An explicit number on resume is compared as always (a different one is refused).
"""

from __future__ import annotations

from imagemill.core.layout import OutputLayout
from imagemill.core.spec import JobSpec


def with_recorded_batch_size(spec: JobSpec, output: OutputLayout, overwrite: bool) -> JobSpec:
    """`spec` with `auto` replaced by the batch size the output's job record holds; unchanged for a
    numbered spec, a new output, or `--overwrite` (which starts the job again: its actors probe)."""
    if spec.workers.batch_size != "auto" or overwrite:
        return spec
    record = output.read_job_record(warn=False)
    recorded = record["fingerprint"].get("workers", {}).get("batch_size") if record else None
    if type(recorded) is int and recorded > 0:
        return spec.with_batch_size(recorded)
    return spec
