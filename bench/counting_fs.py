"""A local filesystem that counts the bytes read through it, for bench/memory.py only.

`counting:///path` is the local file /path; every read appends `<pid> <bytes>` to the file named by
$COUNTING_FS_LOG (O_APPEND: the driver, the actors and the piece server all write to it). `register`
makes the protocol known to fsspec; the benchmark's driver calls it and passes it to Ray as the
worker_process_setup_hook, so every Ray worker process knows it too.
"""

from __future__ import annotations

import os
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

LOG_VARIABLE = "COUNTING_FS_LOG"


def _count(size: int) -> None:
    if size:
        fd = os.open(os.environ[LOG_VARIABLE], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, f"{os.getpid()} {size}\n".encode())
        finally:
            os.close(fd)


class CountingFile:
    """A file whose reads are counted; everything else goes to the file."""

    def __init__(self, file: Any):
        self._file = file

    def read(self, size: int = -1) -> bytes:
        data = self._file.read(size)
        _count(len(data))
        return data

    def readinto(self, buffer: Any) -> int:
        size = self._file.readinto(buffer)
        _count(size or 0)
        return size

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)

    def __enter__(self) -> CountingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()


class CountingFileSystem(LocalFileSystem):
    protocol = ("counting",)
    root_marker = "/"

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        return LocalFileSystem._strip_protocol(str(path).removeprefix("counting://"))

    def unstrip_protocol(self, name: str) -> str:
        return f"counting://{self._strip_protocol(name)}"

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        file = super()._open(path, mode, **kwargs)
        return CountingFile(file) if "r" in mode else file


def register() -> None:
    fsspec.register_implementation("counting", CountingFileSystem, clobber=True)


def bytes_read(log: str) -> dict[int, int]:
    """Bytes read, by process id."""
    totals: dict[int, int] = {}
    with open(log) as f:
        for line in f:
            pid, size = map(int, line.split())
            totals[pid] = totals.get(pid, 0) + size
    return totals
