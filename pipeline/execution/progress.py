"""The driver's progress: a bar on a terminal, a periodic log line anywhere else, and the heartbeat's copy.

Progress counts images, not shards: the committed shards' rows plus the rows drawn so far in the shards
still running, which the executor reports (a `Live`) at least every `progress_seconds()`. While no
worker has loaded the model yet, the line says so instead ("loading the model on 2 workers…").

A tqdm bar redraws itself with carriage returns, which in a file (`2> log`, `kubectl logs`, a Ray
job's log) become fragments glued into every log line. So the bar is drawn only when stderr is a
terminal and the caller wants it; otherwise one plain line is logged at least every `progress_seconds()` or
each time another LOG_EVERY_FRACTION of the images is done, whichever comes first, and once at the end.
The same counts go into the output's lease at each heartbeat (`OutputLease.progress`), where
`imagemill status` reads them.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Protocol

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from imagemill.core.errors import ImagemillError
from imagemill.core.lease import OutputLease
from imagemill.core.records import RunProgress, ShardStats
from imagemill.execution.executor import Live

log = logging.getLogger(__name__)
PROGRESS_ENV = "IMAGEMILL_PROGRESS_SECONDS"
DEFAULT_PROGRESS_SECONDS = 30.0
MIN_PROGRESS_SECONDS = 0.5
LOG_EVERY_FRACTION = 0.1
# Executors report every fifth of the interval (poll_seconds), and a line is logged at the first
# report past three quarters of it: lines are never further apart than the interval.
POLLS_PER_INTERVAL = 5
LINE_EARLY = 0.75


def progress_seconds() -> float:
    """The longest time without a progress line: IMAGEMILL_PROGRESS_SECONDS, else 30 s. At least
    MIN_PROGRESS_SECONDS: the driver reads the workers' counts that often, and a near-zero interval
    would have it do nothing else."""
    text = os.environ.get(PROGRESS_ENV, "")
    try:
        value = float(text) if text else DEFAULT_PROGRESS_SECONDS
    except ValueError:
        value = math.nan
    if not (MIN_PROGRESS_SECONDS <= value < math.inf):
        raise ImagemillError(
            f"{PROGRESS_ENV}={text!r} is not a number of seconds from {MIN_PROGRESS_SECONDS:g} up; "
            "unset it (30 s) or fix it"
        )
    return value


def poll_seconds() -> float:
    """How often an executor reports its progress (`ShardWork.on_progress`) at least."""
    return progress_seconds() / POLLS_PER_INTERVAL


def workers(count: int) -> str:
    return f"{count} worker" if count == 1 else f"{count} workers"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class Display(Protocol):
    def show(self, progress: RunProgress) -> None: ...


class ProgressLog:
    """Images done of the total, shards done, this run's images/s and the time left, as a log line;
    while no worker has loaded the model, a line saying it is loading."""

    def __init__(self, rows_total: int, rows_done: int, every: float):
        self.rows_total = rows_total
        self.rows_at_start = rows_done
        self.every = every * LINE_EARLY  # the next report after this is within `every`: see poll_seconds
        self.loading_since: float | None = None  # the first report of workers loading
        self.loading_seen = time.monotonic()  # the last time no worker was ready: the rate counts from it
        self.generating = False
        self.next_time = self.loading_seen  # the first loading line comes at once
        self.tenths = self._tenths(rows_done)
        self.ended = False

    def _tenths(self, rows: int) -> int:
        """How many whole LOG_EVERY_FRACTIONs of the images `rows` is (integers: no rounding drift)."""
        return int(rows * round(1 / LOG_EVERY_FRACTION) // self.rows_total) if self.rows_total else 0

    def show(self, progress: RunProgress) -> None:
        now = time.monotonic()
        if not self.generating and progress.workers_ready == 0 and progress.images_done == self.rows_at_start:
            self.loading_seen = now
            if progress.workers_loading and now >= self.next_time:
                self.next_time = now + self.every
                since = self.loading_since = self.loading_since or now
                waited = f" {_duration(now - since)}" if now > since + 1 else ""
                hint = " (`ray status` shows workers not yet placed)" if waited else ""
                log.info("loading the model on %s…%s%s", workers(progress.workers_loading), waited, hint)
            return
        if not self.generating:
            self.generating = True
            self.next_time = now + self.every
        end = progress.shards_done == progress.shards_total
        tenths = self._tenths(progress.images_done)
        if self.ended or (now < self.next_time and tenths <= self.tenths and not end):
            return
        self.ended = end
        self.next_time = now + self.every
        self.tenths = tenths
        rate = (progress.images_done - self.rows_at_start) / max(now - self.loading_seen, 1e-9)
        left = self.rows_total - progress.images_done
        eta = _duration(left / rate) if rate > 0 else "unknown"
        percent = 100 * progress.images_done / self.rows_total if self.rows_total else 100.0
        log.info(
            "progress: %d/%d images (%.0f%%), %d/%d shards, %.1f images/s, %s left",
            progress.images_done,
            self.rows_total,
            percent,
            progress.shards_done,
            progress.shards_total,
            rate,
            eta,
        )


class BarProgress:
    """The tqdm bar, for a terminal; it says when the model is loading."""

    def __init__(self, bar: tqdm):
        self.bar = bar

    def show(self, progress: RunProgress) -> None:
        loading = progress.workers_ready == 0 and progress.workers_loading
        self.bar.set_postfix_str(f"loading the model on {workers(loading)}" if loading else "", refresh=False)
        self.bar.n = progress.images_done
        self.bar.refresh()


class RunProgressTracker:
    """The run's progress from the executor's reports and the commits: shown on `display` and handed to
    the lease, whose next heartbeat writes it. Reports come from the executor's thread, commits from the
    runner's; one lock keeps the counts whole."""

    def __init__(
        self,
        display: Display,
        lease: OutputLease,
        committed: Mapping[str, ShardStats],
        rows_total: int,
        shards_total: int,
    ):
        """`committed`: the job's committed shards, a mapping the runner adds each new one to."""
        self.display = display
        self.lease = lease
        self.committed = committed
        self.rows_total = rows_total
        self.shards_total = shards_total
        self.live = Live(workers_loading=0, workers_ready=0)
        self.failed: set[str] = set()
        self.lock = threading.Lock()

    def report(self, live: Live) -> None:
        """The executor's latest: workers loading and ready, images drawn in each running shard."""
        with self.lock:
            self.live = live
            self._show()

    def shard_ended(self, shard_id: str | None = None) -> None:
        """A shard committed (it is in `committed` now) or, with its id, failed all its tries."""
        with self.lock:
            if shard_id is not None:
                self.failed.add(shard_id)
            self._show()

    def _show(self) -> None:
        drawn = sum(
            images
            for shard_id, images in self.live.drawn.items()
            if shard_id not in self.committed and shard_id not in self.failed
        )
        progress = RunProgress(
            images_done=min(sum(stats.rows for stats in self.committed.values()) + drawn, self.rows_total),
            images_total=self.rows_total,
            shards_done=len(self.committed),
            shards_total=self.shards_total,
            workers_ready=self.live.workers_ready,
            workers_loading=self.live.workers_loading,
        )
        self.lease.progress = progress
        self.display.show(progress)


@contextmanager
def progress_display(name: str, rows_total: int, rows_done: int, bar: bool) -> Iterator[Display]:
    """A bar when `bar` is asked for and stderr is a terminal, else the periodic progress line."""
    if not (bar and sys.stderr.isatty()):
        yield ProgressLog(rows_total, rows_done, progress_seconds())
        return
    shown = tqdm(total=rows_total, initial=rows_done, unit="img", desc=name, mininterval=1.0, smoothing=0.1)
    with shown, logging_redirect_tqdm():
        yield BarProgress(shown)
