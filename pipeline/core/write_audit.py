"""An optional log of every write into an output, with the run that made it, for checking after the fact
that no run wrote once it had lost the output's lease (bench/chaos.py checks it).

Why a log and not only the gate's check: the check (`OwnedOutput.check`) and the write are two steps,
and a process paused between them writes late; only a record of when each write landed, next to when
each run took the lease, shows whether that ever happened. Off unless `IMAGEMILL_WRITE_AUDIT` names a
local file; then the write gate (`core/write_gate.py`) and the lease (`core/lease.py`), the only
modules that write into an output, append one JSON line per write that succeeded:
`{"run", "op", "path", "start", "end", "pid"}` (times: `time.time()` on this host; `end` is taken
after the write returned). Lines are appended with one `write` on an `O_APPEND` descriptor, so the
driver and every actor on this host can share one file.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator

AUDIT_ENV = "IMAGEMILL_WRITE_AUDIT"

# The ops a line's "op" may be: bytes written (`write`: a whole file; `publish`: a shard's staged file made
# visible, create-only), files deleted (`delete`: paths joined by spaces; `delete_folder`), and the
# lease's own changes (`lease_take`, `lease_beat`, `lease_release`). A shard's files being staged are
# not logged: they are in the attempt's own folder, seen by no one until `publish`.


@contextlib.contextmanager
def audited(run_id: str | None, op: str, path: str) -> Iterator[None]:
    """Log the write in the block once it has succeeded (nothing when it raises, or with no audit file)."""
    target = os.environ.get(AUDIT_ENV)
    start = time.time()
    yield
    if target:
        line = {"run": run_id, "op": op, "path": path, "start": start, "end": time.time(), "pid": os.getpid()}
        fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(line) + "\n").encode())
        finally:
            os.close(fd)


def read_audit(path: str) -> list[dict]:
    """The log's lines, in the order they were appended (a line cut short by a killed process is skipped)."""
    entries = []
    with open(path) as f:
        for text in f:
            with contextlib.suppress(ValueError):
                entries.append(json.loads(text))
    return entries
