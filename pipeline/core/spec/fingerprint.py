"""The fingerprint: the settings that decide what a job's output holds, and so must not change when
the job resumes into the same output.

It is every field of the spec but those marked NOT_FINGERPRINTED (imagemill.core.spec.markers): where
things are read and written (paths of the output, storage options), how many workers run, retry limits,
budgets and prices. The input path is in it, but not the files it holds: new files added to a folder
are new work for the same job (the nightly case). The output's `_job.json` records it; a resume
compares the two field by field (imagemill.output.claim).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from imagemill.core.spec.markers import NOT_FINGERPRINTED, dumped

if TYPE_CHECKING:
    from imagemill.core.spec.job import JobSpec


def fingerprint(spec: JobSpec) -> dict[str, Any]:
    """The spec's fingerprinted fields, as nested dicts (workers.batch_size already a number when the
    job resolved `auto`)."""
    return dumped(spec, leave_out=NOT_FINGERPRINTED)
