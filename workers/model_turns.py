"""The model handed between an actor's concurrent shard calls, one at a time, in the order they came.

The actor runs two `process_shard` calls at once (the scheduler keeps it two shards deep), so shard
n+1 is read and validated while shard n generates. Each call takes a ticket as it starts and holds
the model only for its generate loop; the model goes to the tickets in order, and a call that fails
before its turn gives its ticket up, so the next one is not kept waiting.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager


class ModelTurns:
    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._issued = 0
        self._serving = 0
        self._finished: set[int] = set()  # tickets done or given up, later than the one being served
        self._released_at: float | None = None  # when the model was last handed back

    @contextmanager
    def ticket(self) -> Iterator[Turn]:
        """A place in line for the model, held for the whole shard call; `with turn:` holds the model."""
        with self._changed:
            number = self._issued
            self._issued += 1
        try:
            yield Turn(self, number)
        finally:
            self._finish(number, held=False)  # a no-op after the turn was taken; gives it up otherwise

    def _wait(self, number: int) -> float:
        """Wait for turn `number`; returns how long the model sat unused before this turn took it."""
        with self._changed:
            self._changed.wait_for(lambda: self._serving == number)
            return time.monotonic() - self._released_at if self._released_at is not None else 0.0

    def _finish(self, number: int, held: bool) -> None:
        with self._changed:
            if number < self._serving:
                return
            if held:
                self._released_at = time.monotonic()
            self._finished.add(number)
            while self._serving in self._finished:
                self._finished.remove(self._serving)
                self._serving += 1
            self._changed.notify_all()


class Turn(AbstractContextManager):
    """One call's place in line. Entering waits for the model; `idle_seconds` then says how long the
    model had sat unused since the previous holder gave it back (zero for the actor's first turn)."""

    def __init__(self, turns: ModelTurns, number: int):
        self.turns = turns
        self.number = number
        self.idle_seconds = 0.0

    def __enter__(self) -> Turn:
        self.idle_seconds = self.turns._wait(self.number)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.turns._finish(self.number, held=True)
