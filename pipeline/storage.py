"""Filesystem access through fsspec, so that local paths, s3://, gs:// and any other URL work alike.

Credentials come from the environment (AWS_* variables, profiles) as each fsspec backend reads it;
`storage_options` in the spec add anything else. They are passed through and never logged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
from fsspec import AbstractFileSystem

log = logging.getLogger(__name__)
T = TypeVar("T")

ATTEMPTS = 5
FIRST_BACKOFF_SECONDS = 0.5
# Errors that another try cannot fix.
PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[AbstractFileSystem, str]:
    """The filesystem for `url` and the path inside it, as fsspec spells it (no protocol for s3)."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path


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
            delay = FIRST_BACKOFF_SECONDS * 2 ** (attempt - 1)
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
