"""One live run per output: a lease file the driver takes, keeps fresh with a heartbeat, and releases.

Two drivers on one output would mix their images under one job record, and `--overwrite` under a
live run would delete files that run is writing. So a driver takes `OUTPUT/_lease.json` (its run
id, host, pid, start and heartbeat times) before it touches the output, refreshes it every
`stale_after / 3` seconds from a thread, and deletes it at the end. Another driver is refused,
naming the owner, until the owner's heartbeat is older than `stale_after` (the owner was killed or
its machine lost): then it takes the lease over; on the owner's own machine (same host and boot)
a driver whose process is gone is taken over at once. Every write into the output checks that the
lease still names its run (imagemill.core.write_gate), so a run that lost the output writes nothing more.
Each heartbeat also carries the run's latest progress (`OutputLease.progress`, a `RunProgress` of
imagemill.core.records), which `imagemill status` shows while shards run.

Every change is a compare-and-swap on the lease file, as atomic as the store allows:
- local disk: read-compare-write under an exclusive `flock` on the output folder, the new content
  renamed into place (readers never see a partial file);
- S3 (s3fs): conditional writes, `If-None-Match: *` to create, `If-Match: <etag>` to refresh or
  take over, `If-Match` on the delete;
- other fsspec stores: compare, then write (not atomic; the heartbeat still catches a lost lease).

The heartbeat time is the owner's clock: hosts sharing an output need clocks that agree to well
within `stale_after` (IMAGEMILL_LEASE_TIMEOUT seconds, default 60).

Anyone who can write the output can write the lease file, so its fields are judged, never trusted
(`LeaseView.problem`): a lease that does not read as JSON (truncated), or whose `heartbeat` or
`stale_after` is missing, not a number, NaN or infinite, a `stale_after` outside (0, 1 day], or a
heartbeat more than `stale_after` in the future, is taken over like a stale one (with a warning
naming the problem): it can never hold an output for ever, and it never raises. A `_lease.json` that
is a folder or not a regular file (a FIFO would block the read) is a one-line error naming it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import logging
import math
import os
import socket
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from imagemill.core.errors import ImagemillError, shown
from imagemill.core.layout import LEASE_FILE, OutputLayout
from imagemill.core.records import LEASE_PROGRESS_KEY, RunProgress, run_progress
from imagemill.core.storage import retrying, write_file_atomically
from imagemill.core.write_audit import audited

log = logging.getLogger(__name__)

TIMEOUT_ENV = "IMAGEMILL_LEASE_TIMEOUT"
DEFAULT_TIMEOUT_SECONDS = 60.0
BEATS_PER_TIMEOUT = 3  # a lease is stale once this many heartbeats in a row are missing
MAX_STALE_AFTER = 86_400.0  # a lease file asking for longer is not believed: taken over as stale
SHOWN_CHARS = 64  # of each lease field a message names (run id, host, pid): anyone may write them


class _Conflict(Exception):
    """The lease file is no longer the version a compare-and-swap expected."""


class _ObjectStore:
    """Any fsspec store: the version is the content; compare, then write (not atomic)."""

    def __init__(self, output: OutputLayout):
        self.fs = output.fs
        self.path = output.path(LEASE_FILE)

    def read(self) -> tuple[dict[str, Any] | None, Any]:
        """The lease record (None: no lease; {} when unreadable) and its version."""
        self.fs.invalidate_cache(self.path)
        try:
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None, None
        except IsADirectoryError:
            raise _not_a_lease(self.path, "a folder") from None
        return _parse(data), data

    def swap(self, data: bytes | None, expected: Any) -> Any:
        """Write `data` (None: delete) if the lease is still at version `expected`; the new version."""
        if self.read()[1] != expected:
            raise _Conflict
        if data is None:
            self.fs.rm(self.path)
        else:
            self.fs.pipe_file(self.path, data)
        return data


class _LocalStore(_ObjectStore):
    """A local (or mounted) disk: the compare and the write under one exclusive flock."""

    def read(self) -> tuple[dict[str, Any] | None, Any]:
        try:
            mode = os.stat(self.path).st_mode
        except FileNotFoundError:
            return None, None
        if not stat.S_ISREG(mode):  # a FIFO or a device would block or never end the read
            raise _not_a_lease(self.path, "not a regular file")
        return super().read()

    def swap(self, data: bytes | None, expected: Any) -> Any:
        folder = os.path.dirname(self.path)
        os.makedirs(folder, exist_ok=True)
        # The lock is the output folder's own (flock on its descriptor): no lock file is left behind.
        lock = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.read()[1] != expected:
                raise _Conflict
            if data is None:
                os.remove(self.path)
                return None
            # Readers see the old or the new lease, never a part.
            write_file_atomically(LocalFileSystem(), self.path, data)
            return data
        finally:
            os.close(lock)  # closing the descriptor releases the lock


class _S3Store(_ObjectStore):
    """S3 through s3fs: the version is the ETag; every write is conditional on it, so S3 decides."""

    def _etag(self) -> str | None:
        try:
            return self.fs.info(self.path, refresh=True)["ETag"]
        except FileNotFoundError:
            return None

    def read(self) -> tuple[dict[str, Any] | None, Any]:
        # Content and ETag come from two requests: take them only when no write fell in between.
        while True:
            before = self._etag()
            if before is None:
                return None, None
            try:
                data = self.fs.cat_file(self.path)
            except FileNotFoundError:
                continue
            if self._etag() == before:
                return _parse(data), before

    def swap(self, data: bytes | None, expected: Any) -> Any:
        bucket, key, _ = self.fs.split_path(self.path)
        try:
            if data is None:
                self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=expected)
                self.fs.invalidate_cache(self.path)
                return None
            condition = {"mode": "create"} if expected is None else {"IfMatch": expected}
            return self.fs.pipe_file(self.path, data, **condition)["ETag"]
        except FileExistsError:  # If-None-Match failed: someone created the lease first
            raise _Conflict from None
        except OSError as exc:  # s3fs raises a failed If-Match (412) as EINVAL; a missing key as ENOENT
            if exc.errno in (errno.EINVAL, errno.ENOENT) and self._etag() != expected:
                raise _Conflict from None
            raise


def _store(output: OutputLayout) -> _ObjectStore:
    protocols = output.fs.protocol if isinstance(output.fs.protocol, tuple) else (output.fs.protocol,)
    if isinstance(output.fs, LocalFileSystem):
        return _LocalStore(output)
    if "s3" in protocols:
        return _S3Store(output)
    return _ObjectStore(output)


def _not_a_lease(path: str, what: str) -> ImagemillError:
    return ImagemillError(
        f"{path} is {what}, not imagemill's lease file; remove it (no imagemill run uses it) and run again"
    )


def _parse(data: bytes) -> dict[str, Any]:
    """A lease record; an unreadable one is {} (no owner, no heartbeat: stale)."""
    try:
        record = json.loads(data)
    except (ValueError, RecursionError):  # JSON and UTF-8 errors; a file of nested brackets
        return {}
    return record if isinstance(record, dict) else {}


def _seconds(value: Any) -> float | None:
    """A lease field that must be a finite number of seconds, or None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _shown(value: Any) -> str:
    """A lease field as a message may name it: one line, cut short."""
    return shown(value, SHOWN_CHARS)


def _boot_id() -> str | None:
    """This machine's current boot (Linux), so a pid is compared only where it means the same process."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def timeout_seconds() -> float:
    """How long a lease lives without a heartbeat: IMAGEMILL_LEASE_TIMEOUT, else 60 s."""
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(text) if text else DEFAULT_TIMEOUT_SECONDS
    except ValueError:
        value = -1.0
    if not 0 < value <= MAX_STALE_AFTER:  # NaN fails too
        raise ImagemillError(
            f"{TIMEOUT_ENV}={text!r} is not a number of seconds in (0, {MAX_STALE_AFTER:.0f}]; "
            "unset it or fix it"
        )
    return value


@dataclass(frozen=True)
class LeaseView:
    """An output's lease as another process sees it: who holds it and how fresh its heartbeat is."""

    record: dict[str, Any]

    @property
    def run_id(self) -> Any:
        """The run that holds the lease (anything: the file is anyone's to write; compare, never trust)."""
        return self.record.get("run_id")

    @property
    def stale_after(self) -> float | None:
        """The owner's lease timeout, where it is a believable number of seconds."""
        value = _seconds(self.record.get("stale_after"))
        return value if value is not None and 0 < value <= MAX_STALE_AFTER else None

    @property
    def problem(self) -> str | None:
        """Why the lease cannot be believed (it is then taken over as stale), or None."""
        heartbeat = _seconds(self.record.get("heartbeat"))
        if not self.record:
            return "it does not read as a JSON object"
        if heartbeat is None:
            return f"its heartbeat {_shown(self.record.get('heartbeat'))!r} is not a number of seconds"
        if self.stale_after is None:
            return (
                f"its stale_after {_shown(self.record.get('stale_after'))!r} is not a number of seconds "
                f"in (0, {MAX_STALE_AFTER:.0f}]"
            )
        if heartbeat > time.time() + self.stale_after:
            return f"its heartbeat is {heartbeat - time.time():.0f} s in the future"
        return None

    @property
    def age(self) -> float:
        """Seconds since the owner's last heartbeat (infinite for a lease that cannot be believed)."""
        heartbeat = _seconds(self.record.get("heartbeat"))
        return math.inf if heartbeat is None or self.problem else time.time() - heartbeat

    @property
    def stale(self) -> bool:
        return self.problem is not None or self.age > (self.stale_after or 0.0)

    @property
    def dead(self) -> bool:
        """Whether the owner ran on this machine, in this boot, and its process is gone."""
        boot = _boot_id()
        if boot is None or (self.record.get("host"), self.record.get("boot_id")) != (
            socket.gethostname(),
            boot,
        ):
            return False
        try:
            os.kill(int(self.record["pid"]), 0)
        except ProcessLookupError:
            return True
        except (OSError, KeyError, TypeError, ValueError, OverflowError):  # another user's, or no pid
            return False
        return False

    @property
    def job(self) -> str:
        """The name of the job the run holding the lease runs, as a message may show it."""
        return _shown(self.record.get("job", "?"))

    @property
    def progress(self) -> RunProgress | None:
        """The run's progress at its last heartbeat (imagemill.core.records), if it carries one."""
        return run_progress(self.record)

    def owner(self) -> str:
        r = self.record
        run, host, pid = (_shown(r.get(name, "?")) for name in ("run_id", "host", "pid"))
        return f"run {run} on host {host}, pid {pid}"


def read_lease(output: OutputLayout) -> LeaseView | None:
    """The output's lease, or None when no run holds it."""
    store = _store(output)
    record, _ = retrying(store.read, f"reading {store.path}")
    return None if record is None else LeaseView(record)


class OutputLease:
    """This run's hold on an output, from `take` to `release`, kept fresh by a heartbeat thread."""

    def __init__(self, output: OutputLayout, job_name: str, stale_after: float):
        self.output = output
        self.store = _store(output)
        self.run_id = uuid.uuid4().hex[:12]
        self.stale_after = stale_after
        self.record: dict[str, Any] = {
            "run_id": self.run_id,
            "job": job_name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "boot_id": _boot_id(),
            "started_at": datetime.now(UTC).isoformat(),
            "stale_after": stale_after,
        }
        self.version: Any = None
        self.lost_to: str | None = None  # set by the heartbeat when another run took the output
        self.progress: RunProgress | None = None  # set by the driver; the next heartbeat writes it
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="imagemill-lease", daemon=True)

    @classmethod
    @contextlib.contextmanager
    def held(cls, output: OutputLayout, job_name: str) -> Iterator[OutputLease]:
        """Take the output's lease for the `with` block; refuses (ImagemillError) while another run lives."""
        lease = cls(output, job_name, timeout_seconds())
        lease._take()
        try:
            yield lease
        finally:
            lease._release()

    def _data(self) -> bytes:
        now = time.time()
        record = {
            **self.record,
            "heartbeat": now,
            "heartbeat_at": datetime.fromtimestamp(now, UTC).isoformat(),
        }
        if (progress := self.progress) is not None:
            record[LEASE_PROGRESS_KEY] = progress.model_dump()
        return json.dumps(record, indent=2, sort_keys=True).encode()

    def _read(self) -> tuple[dict[str, Any] | None, Any]:
        return retrying(self.store.read, f"reading {self.store.path}")

    def _swap(self, data: bytes | None, expected: Any) -> Any:
        """A compare-and-swap, retried on I/O errors. A write whose answer was lost and whose retry
        then conflicts with itself is recognised by the caller: the lease names this run."""
        return retrying(functools.partial(self.store.swap, data, expected), f"writing {self.store.path}")

    def _take(self) -> None:
        # Logged once the lease is this run's, also where that is known only from a re-read (the
        # answer to its write was lost): core/write_audit.py.
        with audited(self.run_id, "lease_take", self.store.path):
            while True:
                record, version = self._read()
                if record is not None and record.get("run_id") == self.run_id:
                    self.version = version  # our own write, retried after its answer was lost
                    break
                current = None if record is None else LeaseView(record)
                if current is not None and not current.stale and not current.dead:
                    raise ImagemillError(
                        f"{self.output.url} is in use by another imagemill run: {current.owner()}, "
                        f"heartbeat {current.age:.0f} s ago. Wait for it to end or stop it (its lease is "
                        f"taken over once its heartbeat is {current.stale_after:.0f} s old), "
                        "or choose another output path."
                    )
                try:
                    self.version = self._swap(self._data(), version)
                except _Conflict:
                    continue  # another driver got there first: look again
                if current is not None:
                    why = current.problem or (
                        "its process is gone" if current.dead else "its heartbeat stopped"
                    )
                    log.warning(
                        "took over %s from %s (%s; last heartbeat %.0f s ago)",
                        self.output.url,
                        current.owner(),
                        why,
                        current.age,
                    )
                break
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.stale_after / BEATS_PER_TIMEOUT):
            try:
                with audited(self.run_id, "lease_beat", self.store.path):
                    self.version = self._swap(self._data(), self.version)
            except _Conflict:
                record, version = self._read()
                if record is not None and record.get("run_id") == self.run_id:
                    self.version = version
                    continue
                self.lost_to = "no run" if record is None else LeaseView(record).owner()
                log.error(
                    "this run lost %s to %s; its shards will not be committed", self.output.url, self.lost_to
                )
                return
            except ImagemillError as exc:  # `_lease.json` replaced by a folder or a FIFO: not ours any more
                self.lost_to = f"an unreadable lease ({exc})"
                log.error("this run lost %s: %s", self.output.url, exc)
                return
            except OSError as exc:  # storage down for longer than the retries: try at the next beat
                log.warning("could not refresh the lease on %s (%s); trying again", self.output.url, exc)

    def confirm(self) -> None:
        """Raise if another run has taken the output: this run must not write its job record."""
        if self.lost_to is not None:
            raise ImagemillError(
                f"this run lost {self.output.url} to {self.lost_to} (its heartbeat stopped for "
                f"{self.stale_after:.0f} s); the job record is left to that run"
            )

    def _release(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self.lost_to is not None:
            return
        try:
            with audited(self.run_id, "lease_release", self.store.path):
                self._swap(None, self.version)
        except (_Conflict, FileNotFoundError):  # already gone: a retried delete, or taken and released
            pass
        except OSError as exc:  # the lease then goes stale on its own after `stale_after`
            log.warning("could not release the lease on %s (%s)", self.output.url, exc)
