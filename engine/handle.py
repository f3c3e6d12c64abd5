"""A thread-safe handle that runs the engine in a background thread, for synchronous hosts
(Flask, Django, scripts) and event-loop hosts: a blocking call per method, or
:meth:`EngineHandle.start`, which returns at once and reports the result through a callback (an
asyncio host resolves a future with it; ``engine.integrations.x402_sdk`` does)."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import trio

from .config import EngineConfig
from .engine import Engine
from .model import Accepted, Outcome, Payment, Rejected, SettleAnswer
from .outcomes import Statistics

T = TypeVar("T")
log = logging.getLogger("x402_engine.handle")


class EngineHandle:
    """Start with ``EngineHandle(config)``; every method may be called from any thread.

    ``close()`` (or leaving a ``with`` block) stops the engine; unsettled payments stay in the
    ledger and are picked up by the next start.
    """

    def __init__(
        self,
        config: EngineConfig,
        *,
        environ: Mapping[str, str] | None = None,
        start_timeout_s: float = 60.0,
    ) -> None:
        self._config = config
        self._environ = environ
        self._ready = threading.Event()
        self._engine: Engine | None = None
        self._nursery: trio.Nursery | None = None  # calls started without waiting run here
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="x402-engine", daemon=True)
        self._thread.start()
        if not self._ready.wait(start_timeout_s):
            raise TimeoutError("engine did not start in time")
        if self._error is not None:
            raise RuntimeError(f"engine failed to start: {self._error}") from self._error

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported to the starting thread or on close()
            self._error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with (
            Engine.open(self._config, environ=self._environ) as engine,
            trio.open_nursery() as nursery,
        ):
            self._engine = engine
            self._nursery = nursery
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()  # started calls still running end as "stopped"

    def _call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        if self._engine is None or self._token is None or not self._thread.is_alive():
            raise RuntimeError(f"engine is not running: {self._error}")
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def start(
        self,
        fn: Callable[..., Awaitable[T]],
        *args: Any,
        done: Callable[[T | BaseException], None],
    ) -> None:
        """Start ``fn(*args)`` in the engine's thread and return at once; ``done`` is called
        there, exactly once, with the result or the exception (``RuntimeError`` if the engine
        stops first). ``fn`` is one of the engine's methods, e.g. ``handle.engine.settle``:
        an event loop can wait for many calls without a thread each."""
        if self._nursery is None or self._token is None or not self._thread.is_alive():
            raise RuntimeError(f"engine is not running: {self._error}")
        nursery = self._nursery

        def report(outcome: T | BaseException) -> None:
            try:
                done(outcome)
            except Exception:  # the caller's problem (e.g. its loop closed): not the engine's
                log.exception("EngineHandle.start: the done callback raised")

        async def call() -> None:
            try:
                result = await fn(*args)
            except trio.Cancelled:
                report(RuntimeError("the engine stopped before answering"))
                raise
            except Exception as exc:
                report(exc)
                return
            report(result)

        def spawn() -> None:  # in the engine's thread; must not raise (it would end the run)
            try:
                nursery.start_soon(call)
            except RuntimeError:  # the nursery closed: the engine is stopping
                report(RuntimeError("the engine stopped before answering"))

        try:
            self._token.run_sync_soon(spawn)
        except trio.RunFinishedError:
            raise RuntimeError("engine is not running") from None

    @property
    def engine(self) -> Engine:
        """The engine itself, for :meth:`start` (its methods run only in the engine's
        thread)."""
        if self._engine is None:
            raise RuntimeError(f"engine is not running: {self._error}")
        return self._engine

    def supported(self) -> dict[str, Any]:
        """See :meth:`Engine.supported` (the /supported document)."""
        engine = self.engine

        async def document() -> dict[str, Any]:
            return engine.supported()

        return self._call(document)

    def submit(self, payload: Any, requirements: Any) -> Accepted | Rejected:
        """See :meth:`Engine.submit`; returns once the payment is durable."""
        assert self._engine is not None
        return self._call(self._engine.submit, payload, requirements)

    def submit_many(self, items: Sequence[tuple[Any, Any]]) -> list[Accepted | Rejected]:
        """See :meth:`Engine.submit_many`: one crossing into the engine's thread for many."""
        assert self._engine is not None
        return self._call(self._engine.submit_many, items)

    def verify(self, payload: Any, requirements: Any) -> tuple[Payment | None, Rejected | None]:
        """See :meth:`Engine.verify` (a facilitator's /verify: stores nothing)."""
        assert self._engine is not None
        return self._call(self._engine.verify, payload, requirements)

    def settle(self, payload: Any, requirements: Any) -> SettleAnswer:
        """See :meth:`Engine.settle` (a facilitator's /settle: one payment, one purchase)."""
        assert self._engine is not None
        return self._call(self._engine.settle, payload, requirements)

    def wait(self, record_id: int, timeout_s: float = math.inf) -> Outcome:
        assert self._engine is not None
        return self._call(self._engine.wait, record_id, timeout_s)

    def status(self, record_id: int) -> Outcome | None:
        assert self._engine is not None
        return self._call(self._engine.status, record_id)

    def drain(self, timeout_s: float = math.inf) -> None:
        assert self._engine is not None
        self._call(self._engine.drain, timeout_s)

    def statistics(self) -> Statistics:
        assert self._engine is not None
        engine = self._engine

        async def snapshot() -> Statistics:
            return engine.statistics()

        return self._call(snapshot)

    def close(self) -> None:
        if self._token is not None and self._stop is not None and self._thread.is_alive():
            stop = self._stop
            trio.from_thread.run_sync(stop.set, trio_token=self._token)
        self._thread.join(30)
        if self._error is not None:
            raise RuntimeError(f"engine stopped with an error: {self._error}") from self._error

    def __enter__(self) -> EngineHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
