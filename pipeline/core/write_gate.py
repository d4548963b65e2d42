"""The one way into an output: every byte a run writes there, and every file it deletes, goes through
an `OwnedOutput`, the output's layout plus the run's lease.

Why: a driver paused past the lease timeout (Ctrl-Z, a suspended VM) is taken over by another run; when
it resumes it must not write a byte more. Two rules hold that, here and nowhere else:

- Ownership: every write or delete is preceded by `check()`, which reads the lease and raises
  `LeaseLost` unless it still names this run. The driver's scheduler calls it before handing out
  shards, so a run that lost its lease stops at once.
- Create-only shard commits: a check still races with a stall between the check and the write. So an
  actor writes a shard's files to a per-attempt place first (`ShardAttempt`: `OUTPUT/_staging/<run>/`
  on a local disk, the actor's temporary folder for other stores), and its commit publishes each file
  create-only — a hard link on a local disk (fails if the name exists), a conditional PUT
  (`If-None-Match: *`) on S3 — stats last. A path that already holds other bytes fails the commit, so a
  committed shard's files are never replaced by another run's bytes, whatever the timing. (Other
  fsspec stores get fsspec's exists-then-write: not atomic, the ownership check is all they have.)
  A run that stalled between its check and its publish can still create files of a shard the lease
  holder has not committed yet; the holder's commit of that shard then fails with `ShardConflict`, and
  the holder's runner clears that shard's paths and redoes it (execution/runner.py), so what ends up
  committed is the holder's.

`OutputLayout` stays paths and reads; the lease file itself is written by `core/lease.py` only. Every
write and delete here is also logged with its run id when `IMAGEMILL_WRITE_AUDIT` is set
(`core/write_audit.py`), so a soak can check that none landed after its run lost the lease.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from imagemill.core.errors import ImagemillError
from imagemill.core.job_record import read_job_record
from imagemill.core.layout import STAGING_FOLDER, OutputLayout
from imagemill.core.lease import read_lease
from imagemill.core.storage import (
    is_local,
    remove_files,
    remove_folder_if_empty,
    retrying,
    write_file_atomically,
)
from imagemill.core.write_audit import audited

PUBLISH_THREADS = 16


class LeaseLost(ImagemillError):
    """This run no longer holds the output's lease: it must write nothing more there."""


class ShardConflict(ImagemillError):
    """A shard's commit found one of its paths holding other bytes: another run's file, or a cut-short
    attempt's, which the lease holder clears before the shard's retry."""


class OwnedOutput:
    """An output as one run may write it: each write and delete checks first that the run still holds
    the output's lease (`run_id`; None: `unleased`)."""

    def __init__(self, layout: OutputLayout, run_id: str | None):
        self.layout = layout
        self.run_id = run_id

    @classmethod
    def unleased(cls, layout: OutputLayout) -> OwnedOutput:
        """Writes that belong to no run: `imagemill submit`'s note before the job starts, a test's
        fixtures, a worker run outside a job (`imagemill.testing`). Never the runner's or an actor's."""
        return cls(layout, None)

    def check(self) -> None:
        """Raise `LeaseLost` (one line: the output and the run holding it now) unless this run holds
        the output's lease."""
        if self.run_id is None:
            return
        lease = read_lease(self.layout)
        if lease is None or lease.run_id != self.run_id:
            holder = lease.owner() if lease is not None else self._last_run()
            raise LeaseLost(
                f"run {self.run_id} lost {self.layout.url} to {holder}: its heartbeat stopped for longer "
                "than the lease timeout; this run wrote nothing more there and stopped. The output is that "
                "run's now: let it finish (or stop it) and run again to resume, or choose another output path"
            )

    def _last_run(self) -> str:
        """Who took the output, once its lease is gone: the run its job record names (which has ended),
        where that is another run."""
        try:
            record = read_job_record(self.layout, warn=False)
        except ImagemillError:  # a record of another imagemill version
            record = None
        if record is None or record.run_id in (None, self.run_id):
            return "no run (its lease file is gone)"
        return f"run {record.run_id} (ended; it wrote the job record)"

    def write_whole(self, relative: str, data: bytes) -> None:
        """Write a file whole or not at all (records, the report, the evaluation's derived files, the
        marker): a full disk or a killed driver must not leave half of one behind."""
        self.check()
        path = self.layout.path(relative)
        self.layout.fs.makedirs(path.rpartition("/")[0], exist_ok=True)
        with audited(self.run_id, "write", path):
            retrying(lambda: write_file_atomically(self.layout.fs, path, data), f"writing {path}")

    def write_json(self, relative: str, record: dict[str, Any]) -> None:
        self.write_whole(relative, json.dumps(record, indent=2, sort_keys=True, allow_nan=False).encode())

    def remove(self, relative: str) -> None:
        self.remove_files([relative])

    def remove_files(self, relatives: list[str]) -> None:
        """Delete exactly these files (exact paths, missing ones fine), after one ownership check."""
        self.check()
        paths = [self.layout.path(relative) for relative in relatives]
        with audited(self.run_id, "delete", " ".join(paths)):
            remove_files(self.layout.fs, paths)

    def remove_folder_if_empty(self, relative: str) -> None:
        self.check()
        path = self.layout.path(relative)
        with audited(self.run_id, "delete_folder", path):
            remove_folder_if_empty(self.layout.fs, path)

    def clean_staging(self) -> None:
        """Delete every shard attempt's staging folder in the output (`_staging/`, local disks only):
        the lease holder's job, at its start (runs gone or taken over) and its end (its own)."""
        if not is_local(self.layout.fs):
            return
        self.check()
        folder = self.layout.path(STAGING_FOLDER)
        if os.path.lexists(folder):
            _real_folder(folder)
            with audited(self.run_id, "delete_folder", folder):
                shutil.rmtree(folder, ignore_errors=True)

    def create(self, relative: str, data: bytes) -> None:
        """Write a file that is never replaced (an input listing), create-only as a shard's files are
        published: a path already holding these bytes is fine, one holding others is `ShardConflict`."""
        attempt = self.attempt(relative.replace("/", "_"))
        try:
            attempt.write(relative, data)
            attempt.publish()
        finally:
            attempt.discard()

    def attempt(self, shard_id: str) -> ShardAttempt:
        """A new attempt at one shard: its files are staged until `commit`. Checks ownership first, so
        a run that lost the output starts no attempt."""
        self.check()
        return ShardAttempt(self, shard_id)


def _real_folder(path: str) -> None:
    """Refuse, in one line, a staging folder that is a symbolic link (it would lead writes out of the
    output) or not a folder (a file or FIFO someone left under imagemill's name)."""
    if os.path.islink(path) or not os.path.isdir(path):
        raise ImagemillError(
            f"{path} is not a folder (a symbolic link, a file or a FIFO); imagemill stages shard attempts "
            "there: move it away and run again"
        )


class ShardAttempt:
    """One attempt at a shard: `write` stages its files, `commit` publishes them create-only, stats
    last (the stats file's presence commits the shard), then the staging folder is removed; `discard`
    removes it for an attempt that failed."""

    def __init__(self, owned: OwnedOutput, shard_id: str):
        self.owned = owned
        self.shard_id = shard_id
        self.files: list[str] = []  # relative final paths staged and not yet published
        layout = owned.layout
        if is_local(layout.fs):  # beside the output: a hard link publishes without a copy
            base = layout.path(STAGING_FOLDER)
            if not os.path.lexists(base):
                os.makedirs(base, exist_ok=True)  # two shard calls may make it at once
            _real_folder(base)
            self.staging = os.path.join(
                base, owned.run_id or "unleased", f"{shard_id}.{uuid.uuid4().hex[:8]}"
            )
            os.makedirs(self.staging)
        else:
            self.staging = tempfile.mkdtemp(prefix="imagemill-attempt-")

    def _staged(self, relative: str) -> str:
        return os.path.join(self.staging, relative)

    def _stage(self, relative: str, data: bytes) -> None:
        path = self._staged(relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)

    def write(self, relative: str, data: bytes) -> None:
        """Stage one of the shard's files (an image, the tar or data file, metadata, features); safe
        from several writer threads at once."""
        self._stage(relative, data)
        self.files.append(relative)

    def commit(
        self, stats_relative: str, stats: bytes, ours: Callable[[bytes], bool] = lambda _: False
    ) -> bytes | None:
        """Publish the staged files create-only, then the stats file: the shard's commit. Raises
        `LeaseLost` when the run lost the output, `ShardConflict` when a path holds other bytes.
        `ours(existing)`: whether a stats file already there is this run's own commit of the shard (an
        attempt whose answer was lost, retried): it then stands, and its bytes are returned."""
        try:
            self.publish()
            self._stage(stats_relative, stats)
            return self._publish(stats_relative, ours)
        finally:
            self.discard()

    def publish(self) -> None:
        """The files staged so far at their final paths, create-only, after an ownership check; no
        commit record yet (the worker times this as the shard's upload; a test's fixture may stop here)."""
        self.owned.check()
        pending, self.files = list(dict.fromkeys(self.files)), []
        with ThreadPoolExecutor(PUBLISH_THREADS) as pool:
            list(pool.map(self._publish, pending))

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def _publish(self, relative: str, ours: Callable[[bytes], bool] = lambda _: False) -> bytes | None:
        """One staged file at its final path, only if that path is free (None) or holds these very
        bytes, or bytes `ours` accepts (returned): a retry whose first try's answer was lost."""
        layout = self.owned.layout
        staged, path = self._staged(relative), layout.path(relative)
        try:
            with audited(self.owned.run_id, "publish", path):
                if is_local(layout.fs):
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    os.link(staged, path)
                else:
                    with open(staged, "rb") as f:
                        data = f.read()
                    retrying(lambda: layout.fs.pipe_file(path, data, mode="create"), f"writing {path}")
            return None
        except FileExistsError:
            pass
        # Compared only when it is a plain file: a FIFO or a device there would block the read.
        if not is_local(layout.fs) or (os.path.isfile(path) and not os.path.islink(path)):
            existing = layout.read_bytes(relative, warn=False)
            with open(staged, "rb") as f:
                if existing == f.read():
                    return None
            if existing is not None and ours(existing):
                return existing
        raise ShardConflict(
            f"{path} already holds another run's file; shard {self.shard_id} is not committed by this "
            "attempt (the run holding the output clears that shard's paths and tries it again)"
        )
