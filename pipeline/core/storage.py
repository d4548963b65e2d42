"""Filesystem access through fsspec, so that local paths, s3://, gs:// and any other URL work alike.

Credentials come from the environment (AWS_* variables, profiles) as each fsspec backend reads it;
`storage_options` in the spec add anything else. They are passed through and never logged.

Calls on a path are on that exact path: fsspec's `rm`, `cat`, `find`, `glob` and `expand_path` expand
`*`, `?` and `[`, and a user's output may be called `run[12]`, next to a `run1` they must not touch.
So only the single-path calls are used (`rm_file`, `cat_file`, `pipe_file`, `ls`, `info`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)
T = TypeVar("T")

ATTEMPTS = 5
FIRST_BACKOFF_SECONDS = 0.5
# Overrides FIRST_BACKOFF_SECONDS (the others double it), for tests of storage faults that need not wait.
BACKOFF_ENV = "IMAGEMILL_STORAGE_BACKOFF"
# Errors that another try cannot fix.
PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.[0-9a-f]{32}\.tmp")  # write_file_atomically's temporary names
_GLOB_CHARS = re.compile(r"[*?\[]")  # what fsspec's glob expands


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[AbstractFileSystem, str]:
    """The filesystem for `url` and the path inside it, as fsspec spells it (no protocol for s3)."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path


def is_glob(path: str) -> bool:
    """Whether an input path is a glob (it holds a character fsspec's glob expands)."""
    return bool(_GLOB_CHARS.search(path))


def glob_root(pattern: str) -> str:
    """The folder a glob's matches are under: its path up to the last '/' before the first glob
    character (`s3://b/photos/*/x.png` → `s3://b/photos`)."""
    return _GLOB_CHARS.split(pattern, maxsplit=1)[0].rpartition("/")[0]


def files_under(fs: Any, path: str) -> tuple[list[str], str] | None:
    """The files a glob or a folder (searched recursively) names, and the root they are relative to;
    None when `path` is neither (a single file, or nothing). The input listings' one walk: Parquet
    input (planning/shards.py) and image folders (planning/image_listing.py) filter what it finds."""
    if is_glob(path):
        matches = fs.glob(path, detail=True)
        return [name for name, info in matches.items() if info["type"] != "directory"], glob_root(path)
    if fs.isdir(path):
        return fs.find(path), path.rstrip("/")
    return None


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def retrying(action: Callable[[], T], what: str) -> T:
    """Run a storage call, retrying I/O errors with exponential backoff (0.5, 1, 2, 4 s).

    The storage clients retry some errors themselves (s3fs: throttling and 5xx responses, a few
    times, quickly); this outer loop rides out longer outages before a shard is given up.
    """
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return action()
        except PERMANENT_ERRORS:
            raise
        except OSError as exc:
            if attempt == ATTEMPTS:
                raise
            delay = float(os.environ.get(BACKOFF_ENV, FIRST_BACKOFF_SECONDS)) * 2 ** (attempt - 1)
            log.warning(
                "%s failed (%s: %s); try %d of %d in %.1f s",
                what,
                type(exc).__name__,
                exc,
                attempt + 1,
                ATTEMPTS,
                delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def is_local(fs: AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def write_file_atomically(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """Write `path` whole or not at all, so a full disk or a kill mid-write never leaves half a file.

    An object store's put is atomic already. On a local disk the bytes go to a temporary name in the
    same folder, synced, then renamed over `path` (a rename within a folder is atomic); a write that
    fails removes its temporary file. A killed writer may leave one: `temporary_target` names it.
    """
    if not is_local(fs):
        fs.pipe_file(path, data)
        return
    folder, _, name = path.rpartition("/")
    temporary = f"{folder}/.{name}.{uuid.uuid4().hex}.tmp"
    try:
        with open(temporary, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


def temporary_target(name: str) -> str | None:
    """The file name a temporary file of `write_file_atomically` was written for, or None."""
    match = _TEMPORARY.fullmatch(name)
    return match["name"] if match else None


def list_folder(fs: AbstractFileSystem, path: str) -> dict[str, bool]:
    """The names in a folder, each with whether it is a folder itself; {} for a missing folder.

    The listing cache is dropped first: other processes write to outputs.
    """
    fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    folder = path.rstrip("/")
    return {
        entry["name"].rstrip("/").rpartition("/")[2]: entry["type"] == "directory"
        for entry in entries
        if entry["name"].rstrip("/") != folder
    }


def remove_files(fs: AbstractFileSystem, paths: Iterable[str]) -> None:
    """Delete exactly these files, one call each on its exact path; missing ones are fine."""

    def remove(path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            retrying(lambda: fs.rm_file(path), f"deleting {path}")

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(remove, paths))


def remove_folder_if_empty(fs: AbstractFileSystem, path: str) -> None:
    """Remove a local folder when it holds nothing. Object stores have no folders to remove (and
    s3fs's `rmdir` of a bucket's path deletes the bucket), so they are left alone."""
    if is_local(fs):
        with contextlib.suppress(OSError):
            os.rmdir(path)
