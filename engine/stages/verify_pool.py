"""The verify stage on more cores: worker processes that run the ingest checks in batches.

Signature recovery is C, but decoding and checking a payment is Python, and one trio thread
holds one core. With ``ingest.verify_workers = N`` the engine starts N worker processes
(``verify_worker.py``) and sends them the raw payload bytes; the trio thread keeps only the
cheap part (dedup, durable intake, settlement).

Concurrent :meth:`VerifyPool.check` calls join the open batch; a batch leaves as soon as a worker
has room (at most ``inflight_per_worker`` batches each), so at low load a payment travels alone
(one pipe round trip, ~0.1 ms) and under load batches grow to ``batch_max`` on their own. One
event per batch wakes all of its callers. Bounded: at most ``queued_batches_max`` full batches
wait; further callers wait for room. A worker that dies takes the engine down (its batches'
callers get :class:`VerifyWorkerError`): nothing was acknowledged for them.
"""

from __future__ import annotations

import subprocess
import sys
from collections import deque
from collections.abc import Sequence
from typing import Any

import msgspec
import trio
import trio.lowlevel

from ..clock import Clock, Wakeup
from ..config import EngineConfig
from ..model import Payment, Rejected, payment_from_tuple
from .verify_worker import (
    LENGTH,
    READY,
    Result,
    frame,
    request_encoder,
    result_decoder,
)

# Not ``-m engine.stages.verify_worker``: the package imports that module first (runpy warns).
_WORKER_MAIN = "import sys; from engine.stages.verify_worker import main; main()"


class VerifyWorkerError(RuntimeError):
    """A verify worker process failed or answered something unreadable."""


class _Batch:
    __slots__ = ("done", "error", "items", "results")

    def __init__(self) -> None:
        self.items: list[tuple[bytes, bytes]] = []
        self.results: list[Result] = []
        self.done = trio.Event()
        self.error: BaseException | None = None


class _Worker:
    def __init__(self, process: trio.Process) -> None:
        assert process.stdin is not None and process.stdout is not None
        self.process = process
        self.stdin = process.stdin
        self.stdout = process.stdout
        self.inflight: deque[_Batch] = deque()
        self._buffer = bytearray()

    async def receive_frame(self) -> bytes:
        while True:
            if len(self._buffer) >= LENGTH.size:
                (length,) = LENGTH.unpack_from(self._buffer)
                end = LENGTH.size + length
                if len(self._buffer) >= end:
                    body = bytes(self._buffer[LENGTH.size : end])
                    del self._buffer[:end]
                    return body
            chunk = await self.stdout.receive_some(1 << 20)
            if not chunk:
                raise VerifyWorkerError(
                    f"verify worker {self.process.pid} exited ({self.process.poll()})"
                )
            self._buffer += chunk


def as_bytes(value: Any) -> bytes:
    """Payload or requirements as JSON bytes, whatever form the caller used."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, msgspec.Raw | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    return msgspec.json.encode(value)


class VerifyPool:
    """``workers`` verify processes behind an async :meth:`check`. Run :meth:`run` in a
    nursery (``await nursery.start(pool.run)``) before checking."""

    def __init__(
        self,
        config: EngineConfig,
        clock: Clock,
        workers: int,
        *,
        batch_max: int = 512,
        inflight_per_worker: int = 2,
        queued_batches_max: int = 64,
    ) -> None:
        assert workers >= 1 and batch_max >= 1 and inflight_per_worker >= 1
        assert queued_batches_max >= 1
        self._config_json = msgspec.json.encode(config)
        self._clock = clock
        self._count = workers
        self._batch_max = batch_max
        self._inflight_max = inflight_per_worker
        self._queued_max = queued_batches_max
        self._workers: list[_Worker] = []
        self._queue: deque[_Batch] = deque()
        self._open: _Batch | None = None
        self._wakeup = Wakeup()
        self._room = Wakeup()
        self._failed: BaseException | None = None
        self.batches_sent = 0
        self.items_sent = 0

    async def check(
        self, payload: Any, requirements: Any
    ) -> tuple[Payment | None, Rejected | None]:
        """Verify one payment on a worker; same answer as :meth:`Verifier.check`."""
        return (await self.check_many([(payload, requirements)]))[0]

    async def check_many(
        self, items: Sequence[tuple[Any, Any]]
    ) -> list[tuple[Payment | None, Rejected | None]]:
        """Verify several payments (joining and filling batches); answers in order."""
        places: list[tuple[_Batch, int]] = []
        for payload, requirements in items:
            item = (as_bytes(payload), as_bytes(requirements))
            while self._failed is None and self._full():
                await self._room.wait()
            if self._failed is not None:
                raise VerifyWorkerError("verify workers are down") from self._failed
            batch = self._open
            if batch is None or len(batch.items) >= self._batch_max:
                batch = self._open = _Batch()
                self._queue.append(batch)
                self._wakeup.set()
            places.append((batch, len(batch.items)))
            batch.items.append(item)
        self._wakeup.set()
        answers: list[tuple[Payment | None, Rejected | None]] = []
        for batch, index in places:
            await batch.done.wait()
            if batch.error is not None:
                raise VerifyWorkerError(str(batch.error)) from batch.error
            found, rejected = batch.results[index]
            answers.append(
                (
                    None if found is None else payment_from_tuple(found),
                    None if rejected is None else Rejected(*rejected),
                )
            )
        return answers

    def _full(self) -> bool:
        open_has_space = self._open is not None and len(self._open.items) < self._batch_max
        return not open_has_space and len(self._queue) >= self._queued_max

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(self._count):
                    process = await trio.lowlevel.open_process(
                        [sys.executable, "-c", _WORKER_MAIN],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                    )
                    worker = _Worker(process)
                    self._workers.append(worker)
                    await worker.stdin.send_all(frame(self._config_json))
                for worker in self._workers:
                    if await worker.receive_frame() != READY:
                        raise VerifyWorkerError("verify worker did not start")
                    nursery.start_soon(self._read, worker)
                task_status.started()
                await self._dispatch()
        except BaseException as exc:
            self._fail(exc)
            raise
        finally:
            with trio.CancelScope(shield=True):
                for worker in self._workers:
                    if worker.process.returncode is None:
                        worker.process.kill()
                    await worker.process.wait()

    async def _dispatch(self) -> None:
        while True:
            worker = min(self._workers, key=lambda w: len(w.inflight))
            if not self._queue or len(worker.inflight) >= self._inflight_max:
                await self._wakeup.wait()
                continue
            batch = self._queue.popleft()
            if batch is self._open:
                self._open = None  # later callers start a new batch
            self._room.set()
            worker.inflight.append(batch)
            self.batches_sent += 1
            self.items_sent += len(batch.items)
            body = request_encoder.encode((self._clock.now(), batch.items))
            await worker.stdin.send_all(frame(body))

    async def _read(self, worker: _Worker) -> None:
        while True:
            body = await worker.receive_frame()
            batch = worker.inflight.popleft()
            results = result_decoder.decode(body)
            if len(results) != len(batch.items):
                raise VerifyWorkerError(f"{len(results)} answers for {len(batch.items)} items")
            batch.results = results
            batch.done.set()
            self._wakeup.set()

    def _fail(self, exc: BaseException) -> None:
        self._failed = exc
        pending = [*self._queue, *(b for w in self._workers for b in w.inflight)]
        for batch in pending:
            batch.error = exc
            batch.done.set()
        self._queue.clear()
        self._open = None
        self._room.set()
