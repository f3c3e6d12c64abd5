"""One payment, one purchase.

A resource server serves its content when ``/settle`` answers ``success``; so a payment may be
answered ``success`` once, ever. The first ``/settle`` that finds the payment settled (or, in
``deferred`` mode, durable) *sells* it: the sold bit in the dedup index is set with no
checkpoint between test and set (of concurrent callers exactly one wins) and the sale is
written to the ledger before the answer leaves. Every later ``/settle`` of the payment, with any
requirements, from any caller, is refused with ``duplicate_settlement`` and the original
transaction and settlement id, so an honest party can reconcile.

The x402 ``payment-identifier`` extension is the way to retry honestly: a buyer who sends an id
and loses the answer sends the same payload with the same id again and gets the stored answer;
the same id on another payload is refused (``payment_identifier_conflict``).

:class:`Identifiers` is pure bookkeeping; :class:`SaleWriter` makes sales durable, many per
ledger commit (a burst of settles answered by one mined batch is one write).
"""

from __future__ import annotations

import msgspec
import trio

from .clock import Clock
from .ledger import AsyncLedger
from .model import Sale

_BUCKET_S = 60


class Identifiers:
    """payment-identifier ids → the payment (its replay key) they were first sent with, and the
    ids sales were made with. Forgotten with the payment's replay key (after validBefore)."""

    def __init__(self) -> None:
        self._bound: dict[str, bytes] = {}  # id -> replay key of its payment
        self._sold_with: dict[int, tuple[str, str]] = {}  # record id -> (id, mode) of its sale
        self._buckets: dict[int, list[tuple[str, bytes]]] = {}  # validBefore minute -> binds

    def __len__(self) -> int:
        return len(self._bound)

    def bound(self, identifier: str) -> bytes | None:
        """The replay key ``identifier`` is bound to, if any."""
        return self._bound.get(identifier)

    def bind(self, identifier: str, key: bytes, valid_before: int) -> bool:
        """Bind ``identifier`` to the payment with replay key ``key``; False if it is bound
        already (to that payment or another)."""
        if identifier in self._bound:
            return False
        self._bound[identifier] = key
        self._buckets.setdefault(valid_before // _BUCKET_S, []).append((identifier, key))
        return True

    def unbind(self, identifier: str, key: bytes) -> None:
        """Undo :meth:`bind` for a payment that was not accepted after all."""
        if self._bound.get(identifier) == key:
            del self._bound[identifier]

    def sold_with(self, record_id: int) -> tuple[str, str] | None:
        """(identifier, mode) of the sale of ``record_id``, if it was made with an id."""
        return self._sold_with.get(record_id)

    def record_sale(self, record_id: int, identifier: str, mode: str) -> None:
        self._sold_with[record_id] = (identifier, mode)

    def forget_sale(self, record_id: int) -> None:
        self._sold_with.pop(record_id, None)

    def evict_expired(self, now: float, grace_s: int) -> int:
        limit = int(now - grace_s) // _BUCKET_S
        evicted = 0
        for minute in [m for m in self._buckets if m < limit]:
            for identifier, key in self._buckets.pop(minute):
                if self._bound.get(identifier) == key:
                    del self._bound[identifier]
                    evicted += 1
        if evicted:  # a sale made with an id goes with the id's binding
            self._sold_with = {r: v for r, v in self._sold_with.items() if v[0] in self._bound}
        return evicted


class _Group:
    __slots__ = ("done", "error", "sales")

    def __init__(self) -> None:
        self.sales: list[Sale] = []
        self.done = trio.Event()
        self.error: BaseException | None = None


class SaleStatistics(msgspec.Struct, frozen=True):
    sold: int
    writes: int


class SaleWriter:
    """Group commit of sales: every sale waiting when a write starts goes into it."""

    def __init__(self, ledger: AsyncLedger, clock: Clock) -> None:
        self._ledger = ledger
        self._clock = clock
        self._open: _Group | None = None
        self._arrived = trio.Event()
        self._sold = 0
        self._writes = 0

    def statistics(self) -> SaleStatistics:
        return SaleStatistics(self._sold, self._writes)

    async def record(self, sale: Sale) -> None:
        """Return once ``sale`` is in the ledger; raise what the write raised otherwise.
        Uncancellable once queued (shielded): the seller learns whether it sold."""
        group = self._open
        if group is None:
            group = self._open = _Group()
        group.sales.append(sale)
        self._arrived.set()
        with trio.CancelScope(shield=True):
            await group.done.wait()
        if group.error is not None:
            raise group.error

    async def run(self) -> None:
        group: _Group | None = None
        try:
            while True:
                if self._open is None:
                    self._arrived = trio.Event()
                    await self._arrived.wait()
                    continue
                group, self._open = self._open, None
                try:
                    at_ms = int(self._clock.now() * 1000)
                    await self._ledger.run(self._ledger.sync.record_sales, group.sales, at_ms)
                except Exception as exc:  # disk trouble: every seller in the group is told
                    group.error = exc
                else:
                    self._sold += len(group.sales)
                    self._writes += 1
                group.done.set()
                group = None
        finally:
            stopped = RuntimeError("the engine stopped before the sale was recorded")
            for pending in (group, self._open):
                if pending is not None and not pending.done.is_set():
                    pending.error = stopped
                    pending.done.set()
