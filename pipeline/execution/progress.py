"""The driver's progress display: a bar on a terminal, a periodic log line anywhere else.

A tqdm bar redraws itself with carriage returns, which in a file (`2> log`, `kubectl logs`, a Ray
job's log) become fragments glued into every log line. So the bar is drawn only when stderr is a
terminal and the caller wants it; otherwise one plain line is logged every LOG_EVERY_SECONDS or
each time another LOG_EVERY_FRACTION of the images is done, whichever comes first.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger(__name__)
LOG_EVERY_SECONDS = 30.0
LOG_EVERY_FRACTION = 0.1


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class ProgressLog:
    """Rows done of the total, shards done, this run's images/s and the time left, as a log line."""

    def __init__(self, rows_total: int, rows_done: int, shards_total: int):
        self.rows_total = rows_total
        self.rows_done = rows_done
        self.rows_at_start = rows_done
        self.shards_total = shards_total
        self.started = time.monotonic()
        self.next_time = self.started + LOG_EVERY_SECONDS
        self.next_rows = self._next_step(rows_done)

    def _next_step(self, rows: int) -> float:
        step = max(1.0, self.rows_total * LOG_EVERY_FRACTION)
        return (rows // step + 1) * step

    def update(self, rows: int, shards_done: int) -> None:
        self.rows_done += rows
        now = time.monotonic()
        if now < self.next_time and self.rows_done < self.next_rows:
            return
        self.next_time = now + LOG_EVERY_SECONDS
        self.next_rows = self._next_step(self.rows_done)
        rate = (self.rows_done - self.rows_at_start) / max(now - self.started, 1e-9)
        left = self.rows_total - self.rows_done
        eta = _duration(left / rate) if rate > 0 else "unknown"
        percent = 100 * self.rows_done / self.rows_total if self.rows_total else 100.0
        log.info(
            "progress: %d/%d images (%.0f%%), %d/%d shards, %.1f images/s, %s left",
            self.rows_done,
            self.rows_total,
            percent,
            shards_done,
            self.shards_total,
            rate,
            eta,
        )


class BarProgress:
    """The tqdm bar, for a terminal."""

    def __init__(self, bar: tqdm):
        self.bar = bar

    def update(self, rows: int, shards_done: int) -> None:
        self.bar.update(rows)


@contextmanager
def progress_display(
    name: str, rows_total: int, rows_done: int, shards_total: int, bar: bool
) -> Iterator[BarProgress | ProgressLog]:
    """A bar when `bar` is asked for and stderr is a terminal, else the periodic progress line."""
    if not (bar and sys.stderr.isatty()):
        yield ProgressLog(rows_total, rows_done, shards_total)
        return
    shown = tqdm(total=rows_total, initial=rows_done, unit="img", desc=name, mininterval=1.0, smoothing=0.1)
    with shown, logging_redirect_tqdm():
        yield BarProgress(shown)
