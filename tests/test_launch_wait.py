"""The launcher's wait for a run: the status is asked when the log stream ends, not every few seconds.

Each status query starts a ``flwr list`` process (1-2 CPU-seconds); asked every 15 s, they took
~5 % of a two-core machine from the clients. Fake processes and a fake clock stand in for the
SuperLink, the ``flwr log --stream`` process and time.
"""

from __future__ import annotations

import subprocess

from fedlt_app.launch import STATUS_CHECK_SECONDS, STREAM_WAIT_SECONDS, wait_for_run


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class Stream:
    """A ``flwr log --stream`` process that returns after ``ends_at`` seconds (never when None)."""

    def __init__(self, clock: Clock, ends_at: float | None) -> None:
        self.clock, self.ends_at = clock, ends_at

    def poll(self) -> int | None:
        return 0 if self.ends_at is not None and self.clock.now >= self.ends_at else None

    def wait(self, timeout: float) -> int:
        if self.ends_at is not None and self.clock.now + timeout >= self.ends_at:
            self.clock.now = max(self.clock.now, self.ends_at)
            return 0
        self.clock.now += timeout
        raise subprocess.TimeoutExpired("flwr log", timeout)


class SuperLink:
    def __init__(self, clock: Clock, exits_at: float | None = None) -> None:
        self.clock, self.exits_at = clock, exits_at

    def poll(self) -> int | None:
        return 1 if self.exits_at is not None and self.clock.now >= self.exits_at else None


class Status:
    """The run's status as ``flwr list`` would report it: finished from ``finishes_at`` on."""

    def __init__(self, clock: Clock, finishes_at: float) -> None:
        self.clock, self.finishes_at, self.asked = clock, finishes_at, []

    def __call__(self) -> str:
        self.asked.append(self.clock.now)
        return "finished:completed" if self.clock.now >= self.finishes_at else "running"


def wait(status: Status, stream: Stream, superlink: SuperLink, clock: Clock, timeout: float = 10_000) -> str:
    return wait_for_run(status, stream, superlink, timeout, clock=clock, sleep=clock.sleep)


def test_a_streamed_run_is_asked_once_when_its_stream_ends() -> None:
    clock = Clock()
    status = Status(clock, finishes_at=250.0)
    assert wait(status, Stream(clock, ends_at=250.0), SuperLink(clock), clock) == "finished:completed"
    assert status.asked == [250.0]  # not at 15, 30, ... 240 s while the log was streaming


def test_a_long_run_is_asked_every_status_period_while_it_streams() -> None:
    clock = Clock()
    end = 3 * STATUS_CHECK_SECONDS + 7
    status = Status(clock, finishes_at=end)
    assert wait(status, Stream(clock, ends_at=end), SuperLink(clock), clock) == "finished:completed"
    assert len(status.asked) == 4  # three periodic checks (a hung stream cannot hold the launcher), then the end
    assert status.asked[-1] == end


def test_a_hung_stream_does_not_hold_a_finished_run() -> None:
    clock = Clock()
    status = Status(clock, finishes_at=100.0)
    assert wait(status, Stream(clock, ends_at=None), SuperLink(clock), clock) == "finished:completed"
    assert status.asked == [STATUS_CHECK_SECONDS]


def test_a_dropped_stream_is_followed_by_status_checks_until_the_run_finishes() -> None:
    clock = Clock()
    status = Status(clock, finishes_at=100.0)
    assert wait(status, Stream(clock, ends_at=40.0), SuperLink(clock), clock) == "finished:completed"
    assert status.asked[0] == 40.0 and status.asked[-1] >= 100.0
    gaps = [b - a for a, b in zip(status.asked, status.asked[1:], strict=False)]
    assert all(gap == STREAM_WAIT_SECONDS for gap in gaps)


def test_a_superlink_that_exits_ends_the_wait() -> None:
    clock = Clock()
    status = Status(clock, finishes_at=1e9)
    assert wait(status, Stream(clock, ends_at=None), SuperLink(clock, exits_at=50.0), clock) == "superlink-exited"
    assert clock.now < 50.0 + 2 * STREAM_WAIT_SECONDS


def test_the_timeout_returns_the_last_status() -> None:
    clock = Clock()
    status = Status(clock, finishes_at=1e9)
    assert wait(status, Stream(clock, ends_at=None), SuperLink(clock), clock, timeout=700.0) == "running"
    assert clock.now < 700.0 + 2 * STREAM_WAIT_SECONDS
