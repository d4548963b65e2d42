"""Claiming an output for a job: whose files are there, and what `--overwrite` deletes.

An output folder may hold other things than this job's files: the user's own, or another job's
output. A new output (one with no job record) that holds anything imagemill did not write is refused
unless `output.allow_existing` says to write beside it; an output made by a job with other settings
is refused unless `--overwrite`, which then deletes exactly that job's files:

- each committed shard's files its metadata names (its images, or its tar or data file), then its
  embeddings and feature stats (`evaluation:`), then its metadata, then its stats, then its record
  of failed attempts (`attempts/`, imagemill.core.device_ledger);
- for a shard of this job that is not committed (one cut short), everything in `images/<shard_id>/`,
  its tar and data file, its metadata and any stats file: the shard id is imagemill's name for it;
- the image listings (`_input/listing-<n>.parquet`, input.format: images);
- the job record, `_SUCCESS` and the report;

for the shards the output's stats or failed attempts name and the shards this job plans, and nothing
else. A folder is removed only when that leaves it empty. Every call is on an exact path (see
`storage.remove_files`).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow.parquet as pq

from imagemill.core.device_ledger import attempted_shard_ids
from imagemill.core.errors import ImagemillError
from imagemill.core.job_record import read_job_record
from imagemill.core.layout import (
    IMAGE_FOLDERS,
    JOB_RECORD,
    LEASE_FILE,
    LISTING_FOLDER,
    LISTING_NAME,
    MARKERS,
    SHARD_FILE_SUFFIXES,
    STAGING_FOLDER,
    SUBMITTED,
    OutputLayout,
)
from imagemill.core.records import OutdatedRecord, stats_shard_ids
from imagemill.core.shard import ShardPlan
from imagemill.core.spec import JobSpec
from imagemill.core.storage import temporary_target
from imagemill.core.write_gate import OwnedOutput

log = logging.getLogger(__name__)
IMAGE_FOLDER = IMAGE_FOLDERS["files"]  # a folder per shard
OWN_FOLDERS = (IMAGE_FOLDER, *SHARD_FILE_SUFFIXES)  # the folders imagemill writes into
SHOWN_FOREIGN = 3  # entries named in the refusal


def claim_output(spec: JobSpec, owned: OwnedOutput, plan: ShardPlan, overwrite: bool) -> None:
    """Check that this job may write into its output, and with `overwrite` delete a previous job's
    files (through the write gate, `owned`)."""
    output = owned.layout
    shard_ids = {shard.shard_id for shard in plan.shards}
    try:
        previous = read_job_record(output)
    except OutdatedRecord:  # another imagemill's job: --overwrite deletes it like any other
        if not overwrite:
            raise
        previous = None
    if previous is None:
        if not spec.output.allow_existing:
            _refuse_foreign_files(spec, output, shard_ids | stats_shard_ids(output))
    elif not overwrite:
        changed = _changed_settings(previous.fingerprint, spec.fingerprint())
        if changed:
            raise ImagemillError(
                f"{spec.output.path} holds the output of a job with other settings ({', '.join(changed)} "
                "changed); re-running may only resume the same job. Use --overwrite to delete that "
                "output and start again, or choose another output path."
            )
    if overwrite:
        _delete_previous_output(owned, shard_ids)


def _changed_settings(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the settings that differ between two fingerprints."""
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _changed_settings(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}")
    return changed


def _is_own_entry(folder: str, name: str, is_folder: bool, shard_ids: set[str]) -> bool:
    """Whether `folder/name` is a file or folder imagemill writes, at the root or for one of these shards.

    A temporary name left by a record write that was cut short counts as the record's own."""
    if folder == IMAGE_FOLDER:
        return is_folder and name in shard_ids
    if is_folder:
        return not folder and name in (*OWN_FOLDERS, STAGING_FOLDER, LISTING_FOLDER)
    if folder == LISTING_FOLDER:
        return bool(LISTING_NAME.fullmatch(name))
    name = temporary_target(name) or name
    if not folder:
        return name in (*MARKERS, LEASE_FILE, SUBMITTED)
    suffix = SHARD_FILE_SUFFIXES[folder]
    return name.endswith(suffix) and name.removesuffix(suffix) in shard_ids


def _refuse_foreign_files(spec: JobSpec, output: OutputLayout, shard_ids: set[str]) -> None:
    foreign = [
        f"{folder}/{name}".lstrip("/") + ("/" if is_folder else "")
        for folder in ("", *OWN_FOLDERS, LISTING_FOLDER)
        for name, is_folder in sorted(output.entries(folder).items())
        if not _is_own_entry(folder, name, is_folder, shard_ids)
    ]
    if foreign:
        shown = ", ".join(foreign[:SHOWN_FOREIGN])
        more = f" and {len(foreign) - SHOWN_FOREIGN} more" if len(foreign) > SHOWN_FOREIGN else ""
        raise ImagemillError(
            f"{spec.output.path} already holds files imagemill did not write ({shown}{more}); choose a "
            "new or empty output folder, or pass --allow-existing (output.allow_existing: true) to "
            "write beside them (imagemill never deletes them)"
        )


def _named_by_metadata(output: OutputLayout, shard_id: str) -> list[str] | None:
    """The files a shard's metadata names (its `path` column), or None where it has no readable metadata."""
    try:
        with output.fs.open(output.path(OutputLayout.metadata_path(shard_id)), "rb") as f:
            paths = pq.read_table(f, columns=["path"]).column("path").to_pylist()
    except Exception:  # missing or cut short: the shard's folder tells instead
        return None
    return [path for path in set(paths) if path]


def _shard_files(output: OutputLayout, shard_id: str, committed: bool) -> list[str]:
    """A shard's image files, tar or data file: those a committed shard's metadata names, else (a shard
    cut short, whose metadata may be from an earlier attempt) every file in its image folder."""
    folder = f"{IMAGE_FOLDER}/{shard_id}"
    named = _named_by_metadata(output, shard_id) if committed else None
    if named is None:
        named = [f"{folder}/{name}" for name, is_folder in output.entries(folder).items() if not is_folder]
    own = {OutputLayout.tar_path(shard_id), OutputLayout.data_path(shard_id)}
    # Only paths a shard of this id can have: a metadata file must not steer deletion elsewhere.
    return [path for path in named if path in own or path.rpartition("/")[0] == folder] + sorted(own)


def delete_shards(owned: OwnedOutput, shard_ids: list[str], committed: set[str]) -> None:
    """Delete these shards' files: their images (or tar or data file), then metadata, then stats, so
    whatever an interrupted delete leaves is still named. `committed`: those whose metadata names
    their files; the others lose every file of their image folder."""
    output = owned.layout
    with ThreadPoolExecutor(max_workers=16) as pool:
        listed = pool.map(lambda shard_id: _shard_files(output, shard_id, shard_id in committed), shard_ids)
        files = [path for paths in listed for path in paths]
    for batch in (
        files,
        [
            path(shard_id)
            for path in (OutputLayout.embeddings_path, OutputLayout.feature_stats_path)
            for shard_id in shard_ids
        ],
        [OutputLayout.metadata_path(shard_id) for shard_id in shard_ids],
        [OutputLayout.stats_path(shard_id) for shard_id in shard_ids],
    ):
        owned.remove_files(batch)
    for shard_id in shard_ids:
        owned.remove_folder_if_empty(f"{IMAGE_FOLDER}/{shard_id}")


def clear_unfinished(owned: OwnedOutput, shard_ids: set[str]) -> None:
    """Delete what these uncommitted shards left at their final paths (a commit cut short publishes
    some files and no stats), so that their next attempt publishes into free paths: a commit never
    replaces a file (imagemill.core.write_gate). One listing per folder finds them."""
    output = owned.layout
    present = {
        name if folder == IMAGE_FOLDER else name.removesuffix(SHARD_FILE_SUFFIXES[folder])
        for folder in OWN_FOLDERS
        for name, is_folder in output.entries(folder).items()
        if is_folder == (folder == IMAGE_FOLDER)
    }
    if leftovers := sorted(present & shard_ids):
        log.info("deleting what %d unfinished shards left in %s", len(leftovers), output.url)
        delete_shards(owned, leftovers, committed=set())


def _delete_previous_output(owned: OwnedOutput, planned: set[str]) -> None:
    output = owned.layout
    committed = stats_shard_ids(output)
    attempted = attempted_shard_ids(output)  # the previous job's failed attempts are its own spending
    shard_ids = sorted(planned | committed | attempted)
    temporaries = [
        f"{folder}/{name}".lstrip("/")
        for folder in ("", "shards", "attempts")
        for name in output.entries(folder)
        if temporary_target(name) and _is_own_entry(folder, name, False, set(shard_ids))
    ]
    delete_shards(owned, shard_ids, committed)
    owned.remove_files([OutputLayout.attempts_path(shard_id) for shard_id in attempted])
    owned.remove_files([OutputLayout.listing_path(number) for number in output.listing_numbers()])
    # The job record last: whatever an interrupted delete leaves is still named.
    for batch in (temporaries, [name for name in MARKERS if name != JOB_RECORD], [JOB_RECORD]):
        owned.remove_files(batch)
    for folder in (*OWN_FOLDERS, LISTING_FOLDER):
        owned.remove_folder_if_empty(folder)
    log.info("deleted the previous job's output at %s (%d shards)", output.url, len(shard_ids))
