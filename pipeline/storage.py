"""Filesystem access through fsspec, so that local paths, s3://, gs:// and any other URL work alike.

Credentials come from the environment (AWS_* variables, profiles) as each fsspec backend reads it;
`storage_options` in the spec add anything else. They are passed through and never logged.
"""

from __future__ import annotations

from typing import Any

import fsspec
from fsspec import AbstractFileSystem


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[AbstractFileSystem, str]:
    """The filesystem for `url` and the path inside it, as fsspec spells it (no protocol for s3)."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])
