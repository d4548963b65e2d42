"""The drain watch (imagemill.execution.drains) without a cluster: how often it asks, what is new, what
a line says of a deadline. The scheduler's use of it runs on a real cluster in tests/test_drain.py."""

from __future__ import annotations

import time

from imagemill.execution.drains import Drain, DrainWatch


class Answers:
    """The GCS's answers, counted."""

    def __init__(self, draining: dict[str, float | None], gone: dict[str, float | None] | None = None):
        self.draining, self.gone, self.asked = draining, gone or {}, 0

    def ask(self) -> dict[str, float | None]:
        self.asked += 1
        return dict(self.draining)

    def ask_gone(self) -> dict[str, float | None]:
        return dict(self.gone)


def test_each_drain_is_new_once_and_the_gcs_is_asked_at_most_every_period():
    answers = Answers({"a" * 56: time.time() + 60})
    watch = DrainWatch(every=3600, ask=answers.ask, ask_gone=answers.ask_gone)
    assert watch.due()
    [drain] = watch.new_drains()
    assert drain.short == "a" * 8 and 55 < drain.seconds_left() <= 60
    assert not watch.due()  # the next question waits for the period, whatever the loop does
    answers.draining["b" * 56] = None
    assert [d.node_id for d in watch.new_drains()] == ["b" * 56]  # the one seen before is not new
    assert answers.asked == 2 and watch.of("a" * 56) == drain and watch.of(None) is None


def test_a_node_gone_after_its_drain_is_found_only_when_asked_after_a_death():
    """A node released at once (nothing ran there, the driver's own) is gone before the next question."""
    answers = Answers({}, gone={"c" * 56: time.time()})
    watch = DrainWatch(ask=answers.ask, ask_gone=answers.ask_gone)
    assert watch.new_drains() == []
    [drain] = watch.new_drains(gone_too=True)
    assert drain.seconds_left() == 0 and drain.when() == "deadline already past"


def test_what_the_line_says_of_a_deadline():
    assert Drain("d" * 56, None).when() == "no deadline" and Drain("d" * 56, None).seconds_left() == float(
        "inf"
    )
    assert Drain("d" * 56, time.time() - 5).when() == "deadline already past"
    assert Drain("d" * 56, time.time() + 90.4).when() in ("deadline in 90 s", "deadline in 89 s")
