"""Where a job must not write, checked before it writes anything; each refusal is one line (exit 2).

- The root folder, the home folder, an empty path: an output there mixes the job's files with
  everything else, and such a path is most often a typo or an unset variable.
- The input: an output at or under an input folder, or one an input glob reaches, is read back as
  prompts by the next run, which then grows with every run.
- A bucket that does not exist: s3fs creates a missing bucket on the first write, so a typo in its
  name would make a new bucket instead of an error.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from fsspec import AbstractFileSystem
from fsspec.utils import glob_translate

from imagemill.core.errors import ImagemillError
from imagemill.core.layout import MARKERS, OutputLayout
from imagemill.core.shard import ShardPlan
from imagemill.core.spec import JobSpec
from imagemill.core.storage import filesystem, glob_root, is_glob, is_local

# Object stores whose first path component is a bucket (or container) their clients may create.
BUCKET_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss"}


def check_output_location(spec: JobSpec, plan: ShardPlan) -> None:
    """Refuse an output no job should write to, before anything is written there."""
    fs, path = filesystem(spec.output.path, spec.output.storage_options)
    _refuse_everything_folders(spec.output.path, fs, path)
    _refuse_missing_bucket(spec.output.path, fs, path)
    _refuse_the_input(spec, fs, path, plan)  # first: an output that is the input file is said as such
    _refuse_a_file(spec.output.path, fs, path)


def _refuse_a_file(url: str, fs: AbstractFileSystem, path: str) -> None:
    """A local output that is a file: said before the lease tries to write into it as a folder."""
    if is_local(fs) and os.path.isfile(path):
        raise ImagemillError(
            f"{url} is a file where a folder must be; output.path must name a folder (or a URL prefix), "
            "not a file"
        )


def _refuse_everything_folders(url: str, fs: AbstractFileSystem, path: str) -> None:
    if is_local(fs):
        shown = url or "/"  # the spec's paths lose their trailing '/', so '/' arrives as ''
        real = os.path.realpath(shown)
        if real == "/":
            problem = "is the root folder"
        elif real == os.path.realpath(Path.home()):
            problem = "is the home folder"
        else:
            return
    elif not path.strip("/"):
        shown, problem = url, "names no bucket or folder"
    else:
        return
    raise ImagemillError(
        f"output.path {shown} {problem}: a job's output needs a folder of its own; "
        "name a new or empty folder (one under it is fine)"
    )


def _protocols(fs: AbstractFileSystem) -> set[str]:
    return {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)


def _refuse_missing_bucket(url: str, fs: AbstractFileSystem, path: str) -> None:
    if not _protocols(fs) & BUCKET_STORES:
        return
    bucket = path.split("/", 1)[0]
    if not fs.exists(bucket):
        raise ImagemillError(
            f"output bucket '{bucket}' does not exist, or these credentials cannot see it ({url}); "
            "imagemill never creates buckets: create it, or correct output.path"
        )


def _at_or_under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _refuse_the_input(spec: JobSpec, fs: AbstractFileSystem, path: str, plan: ShardPlan) -> None:
    input_fs, input_path = filesystem(spec.input.path, spec.input.storage_options)
    if not _protocols(input_fs) & _protocols(fs):
        return  # different stores: they cannot overlap
    output, source = spec.output.path, spec.input.path
    if is_glob(input_path):
        if _glob_reaches(input_path, input_fs, path, plan):
            raise ImagemillError(
                f"input glob {source} matches files the job writes under output {output}: the next "
                "run would read them as prompts; narrow the glob or choose an output outside it"
            )
    elif input_fs.isdir(input_path):
        if _at_or_under(path, input_path):
            where = "is the input folder" if path == input_path else f"is inside the input folder {source}"
            raise ImagemillError(
                f"output {output} {where}: the next run would read the job's own metadata as prompts; "
                "choose an output outside the input folder"
            )
    elif path == input_path:
        raise ImagemillError(f"output {output} is the input file: choose another output folder")


def _glob_reaches(pattern: str, input_fs: AbstractFileSystem, output: str, plan: ShardPlan) -> bool:
    """Whether the input glob matches a file the job has written, or will write, under `output`."""
    literal_root = glob_root(pattern)
    if not _at_or_under(output, literal_root):
        return False
    if any(_at_or_under(input_fs._strip_protocol(url), output) for url in plan.files):
        return True
    try:
        matches = re.compile(glob_translate(pattern)).match
    except ValueError:  # a pattern fsspec cannot glob has already failed to list
        return False
    written = list(MARKERS)
    for shard in plan.shards:
        shard_id = shard.shard_id
        written += [
            OutputLayout.metadata_path(shard_id),
            OutputLayout.data_path(shard_id),
            OutputLayout.tar_path(shard_id),
            OutputLayout.stats_path(shard_id),
            OutputLayout.embeddings_path(shard_id),
            OutputLayout.feature_stats_path(shard_id),
        ]
    return any(matches(f"{output}/{relative}") for relative in written)
