"""A thread-safe handle that runs the engine in a background thread, for synchronous hosts
(Flask, Django, scripts) and asyncio hosts (call it through ``loop.run_in_executor``)."""

from __future__ import annotations

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
        async with Engine.open(self._config, environ=self._environ) as engine:
            self._engine = engine
            self._ready.set()
            await self._stop.wait()

    def _call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        if self._engine is None or self._token is None or not self._thread.is_alive():
            raise RuntimeError(f"engine is not running: {self._error}")
        return trio.from_thread.run(fn, *args, trio_token=self._token)

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
