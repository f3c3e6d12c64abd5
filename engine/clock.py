"""The engine's one injectable clock.

Every stage reads wall-clock time (seconds since the Unix epoch, as used by EIP-3009's
validAfter/validBefore) through a :class:`Clock`. The default, :class:`TrioWallClock`, follows
trio's clock, so a test that runs under ``trio.testing.MockClock`` moves the engine's notion of
"now" and its sleeps together.
"""

from __future__ import annotations

import time
from typing import Protocol

import trio


class Clock(Protocol):
    """Wall-clock time in Unix seconds."""

    def now(self) -> float: ...


class SystemClock:
    """Plain ``time.time()``; usable outside trio."""

    def now(self) -> float:
        return time.time()


class TrioWallClock:
    """Unix time that advances with ``trio.current_time()``.

    Created inside a trio run; under a ``MockClock`` the engine's time jumps with the mock.
    """

    def __init__(self, start_unix: float | None = None) -> None:
        base = time.time() if start_unix is None else start_unix
        self._offset = base - trio.current_time()

    def now(self) -> float:
        return self._offset + trio.current_time()


class ManualClock:
    """A clock the caller sets by hand (pure-logic tests)."""

    def __init__(self, start_unix: float) -> None:
        self._now = start_unix

    def now(self) -> float:
        return self._now

    def set(self, unix: float) -> None:
        self._now = unix

    def advance(self, seconds: float) -> None:
        self._now += seconds


async def sleep_until_unix(clock: Clock, deadline_unix: float) -> None:
    """Sleep on trio's clock until ``clock`` reads ``deadline_unix`` (no-op if passed)."""
    delay = deadline_unix - clock.now()
    if delay > 0:
        await trio.sleep(delay)
