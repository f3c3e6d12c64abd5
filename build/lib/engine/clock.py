"""Time and waiting.

trio's clock is the one injection point for time: the engine reads wall-clock time (seconds
since the Unix epoch, as EIP-3009's validAfter/validBefore use it) through a
:class:`TrioWallClock`, which follows trio's clock, and it sleeps with trio. A test that runs
under ``trio.testing.MockClock`` therefore moves "now" and every sleep together; a
:class:`TrioWallClock` with a ``start_unix`` puts that "now" anywhere in time.

:class:`ManualClock` and :class:`SystemClock` are for pure logic and helpers that never sleep
(they are not part of the public API). :class:`Wakeup` is the one re-armable event.
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


class Wakeup:
    """A re-armable event: :meth:`set` wakes every task waiting now; :meth:`wait` waits for the
    next :meth:`set` (check the condition first, with no checkpoint between that check and
    the wait)."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = trio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        if self._event.is_set():
            self._event = trio.Event()
        await self._event.wait()
