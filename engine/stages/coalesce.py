"""Coalescing: many concurrent questions, few answers from the chain.

Callers :meth:`Coalescer.ask` one question each; the run loop gathers the questions that arrive
within ``window_s`` of the first (or while earlier reads are in flight), up to ``batch_max``,
and answers them with one call of ``answer`` (one ``eth_call`` for many payments). At most
``inflight_max`` answers run at once; at most ``queue_max`` questions wait (then askers wait for
room: backpressure). If ``answer`` raises, every asker of that batch gets the exception.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import trio

from ..clock import Wakeup

log = logging.getLogger("x402_engine.coalesce")
Q = TypeVar("Q")
A = TypeVar("A")


class _Pending(Generic[Q, A]):
    __slots__ = ("answer", "done", "error", "question")

    def __init__(self, question: Q) -> None:
        self.question = question
        self.done = trio.Event()
        self.answer: A | None = None
        self.error: Exception | None = None


class Coalescer(Generic[Q, A]):
    """Run :meth:`run` in a nursery; :meth:`ask` from anywhere in the same trio run."""

    def __init__(
        self,
        answer: Callable[[list[Q]], Awaitable[list[A]]],
        *,
        window_s: float,
        batch_max: int,
        inflight_max: int = 1,
        queue_max: int = 10_000,
        what: str = "questions",
    ) -> None:
        assert window_s >= 0 and inflight_max >= 1 and 1 <= batch_max <= queue_max
        self._answer = answer
        self._window_s = window_s
        self._batch_max = batch_max
        self._queue_max = queue_max
        self._what = what
        self._slots = trio.Semaphore(inflight_max)
        self._queue: deque[_Pending[Q, A]] = deque()
        self._arrived = Wakeup()
        self._room = Wakeup()
        self.calls = 0  # answers made
        self.answered = 0  # questions answered by them

    def queued(self) -> int:
        return len(self._queue)

    async def ask(self, question: Q) -> A:
        """The answer to ``question``, with others'; raises what answering raised."""
        while len(self._queue) >= self._queue_max:
            await self._room.wait()
        pending: _Pending[Q, A] = _Pending(question)
        self._queue.append(pending)
        self._arrived.set()
        await pending.done.wait()
        if pending.error is not None:
            raise pending.error
        return pending.answer  # type: ignore[return-value]  # set with done, error unset

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                if not self._queue:
                    await self._arrived.wait()
                    continue
                if self._window_s:
                    await trio.sleep(self._window_s)  # let concurrent questions join
                await self._slots.acquire()
                take = min(self._batch_max, len(self._queue))
                batch = [self._queue.popleft() for _ in range(take)]
                self._room.set()
                nursery.start_soon(self._answer_batch, batch)

    async def _answer_batch(self, batch: list[_Pending[Q, A]]) -> None:
        try:
            answers = await self._answer([p.question for p in batch])
            if len(answers) != len(batch):
                raise ValueError(f"{len(answers)} answers for {len(batch)} {self._what}")
            self.calls += 1
            self.answered += len(batch)
            for pending, answer in zip(batch, answers, strict=True):
                pending.answer = answer
        except Exception as exc:  # node trouble or a malformed answer: every asker is told
            log.warning("answering %d %s failed: %s", len(batch), self._what, exc)
            for pending in batch:
                pending.error = exc
        finally:
            self._slots.release()
            for pending in batch:
                pending.done.set()
