"""Recording outcomes: every state change goes to the ledger first, then to waiters and counters.

Stages call a :class:`Recorder`; it owns the write-then-notify order, so an outcome a caller
observes is always already durable.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence

import msgspec
import trio

from .clock import Clock, Wakeup
from .model import (
    FINAL_STATES,
    BatchEvent,
    BatchRecord,
    Outcome,
    PaymentEvent,
    PendingItem,
    hex_addr,
)
from .service.metrics import Histogram
from .store.ledger import AsyncLedger


class Statistics(msgspec.Struct, frozen=True):
    """A snapshot of the engine's counters."""

    accepted: int
    duplicates: int
    rejected: dict[str, int]
    settled: int
    failed: dict[str, int]
    requeued: int
    pending: int
    batches_sent: int
    batches_mined: int
    items_in_mined_batches: int
    gas_used: int
    fee_wei: int


class Tracker:
    """In-memory view of live payments and waiters. Used only from the trio thread."""

    def __init__(self, clock: Clock | None = None, recent_max: int = 100_000) -> None:
        self._live: dict[int, tuple[PendingItem, str, str | None]] = {}  # item, state, tx
        self._recent: OrderedDict[int, Outcome] = OrderedDict()
        self._recent_max = recent_max
        self._waiters: dict[int, trio.Event] = {}
        self.accepted = 0
        self.duplicates = 0
        self.rejected: Counter[str] = Counter()
        self.settled = 0
        self.failed: Counter[str] = Counter()
        self.requeued = 0
        self.batches_sent = 0
        self.batches_mined = 0
        self.items_in_mined_batches = 0
        self.gas_used = 0
        self.fee_wei = 0
        self.all_final = trio.Event()
        self.all_final.set()
        self.changed = Wakeup()  # set on every state change or counter the snapshot shows
        self.settle_latency = Histogram()  # acceptance to final state, seconds
        self.on_final: list[Callable[[PendingItem], None]] = []  # called once per final item
        self._clock = clock
        # When work last moved forward (a batch sent, a payment final): stall detection.
        self.last_progress = clock.now() if clock is not None else 0.0

    def track(self, item: PendingItem, state: str = "accepted", tx_hash: str | None = None) -> None:
        self._live[item.id] = (item, state, tx_hash)
        self.changed.set()
        self.all_final = trio.Event() if self.all_final.is_set() else self.all_final

    def is_live(self, rid: int) -> bool:
        return rid in self._live

    def pending(self) -> int:
        return len(self._live)

    def current(self, rid: int) -> Outcome | None:
        live = self._live.get(rid)
        if live is not None:
            item, state, tx_hash = live
            p = item.payment
            return Outcome(
                rid, state, p.chain_id, hex_addr(p.payer), hex_addr(p.payee), p.value, tx_hash
            )
        return self._recent.get(rid)

    def apply(self, item: PendingItem, event: PaymentEvent) -> None:
        self.changed.set()
        p = item.payment
        if event.state not in FINAL_STATES:
            if event.state == "accepted":
                self.requeued += 1  # handed back: not progress
            elif self._clock is not None:
                self.last_progress = self._clock.now()
            self._live[item.id] = (item, event.state, event.tx_hash)
            return
        if self._clock is not None:
            self.last_progress = self._clock.now()
        outcome = Outcome(
            id=item.id,
            state=event.state,
            chain_id=p.chain_id,
            payer=hex_addr(p.payer),
            payee=hex_addr(p.payee),
            value=p.value,
            tx_hash=event.tx_hash,
            block_number=event.block_number,
            gas_used=event.gas_used,
            reason=event.reason,
            message=event.message,
        )
        if event.state == "settled":
            self.settled += 1
        else:
            self.failed[event.reason or "unknown"] += 1
        if self._live.pop(item.id, None) is not None:
            for hook in self.on_final:
                hook(item)
        if self._clock is not None:
            self.settle_latency.observe(max(0.0, self._clock.now() - item.arrived_at))
        self._recent[item.id] = outcome
        while len(self._recent) > self._recent_max:
            self._recent.popitem(last=False)
        waiter = self._waiters.pop(item.id, None)
        if waiter is not None:
            waiter.set()
        if not self._live:
            self.all_final.set()

    async def wait_final(self, rid: int) -> Outcome | None:
        """Wait while ``rid`` is live; returns its outcome if still in memory."""
        while rid in self._live:
            waiter = self._waiters.setdefault(rid, trio.Event())
            await waiter.wait()
        return self._recent.get(rid)

    def snapshot(self) -> Statistics:
        return Statistics(
            accepted=self.accepted,
            duplicates=self.duplicates,
            rejected=dict(self.rejected),
            settled=self.settled,
            failed=dict(self.failed),
            requeued=self.requeued,
            pending=len(self._live),
            batches_sent=self.batches_sent,
            batches_mined=self.batches_mined,
            items_in_mined_batches=self.items_in_mined_batches,
            gas_used=self.gas_used,
            fee_wei=self.fee_wei,
        )


class Recorder:
    """Durable-then-visible recording of state changes, shared by the stages."""

    def __init__(self, ledger: AsyncLedger, tracker: Tracker, clock: Clock) -> None:
        self.ledger = ledger
        self.tracker = tracker
        self.clock = clock

    def _now_ms(self) -> int:
        return int(self.clock.now() * 1000)

    async def events(self, pairs: Sequence[tuple[PendingItem, PaymentEvent]]) -> None:
        if not pairs:
            return
        await self.ledger.run(self.ledger.sync.append_events, [e for _, e in pairs], self._now_ms())
        for item, event in pairs:
            self.tracker.apply(item, event)

    async def fail(self, items: Sequence[PendingItem], reason: str, message: str) -> None:
        await self.events(
            [(i, PaymentEvent(i.id, "failed", reason=reason, message=message)) for i in items]
        )

    async def requeued(self, items: Sequence[PendingItem], message: str) -> None:
        await self.events([(i, PaymentEvent(i.id, "accepted", message=message)) for i in items])

    async def batch_sent(
        self, batch: BatchRecord, items: Sequence[PendingItem], lease_epoch: int | None = None
    ) -> None:
        """Write-ahead (fenced by the signer's lease on a shared ledger)."""
        events = [
            PaymentEvent(i.id, "submitted", batch_id=batch.id, tx_hash=batch.tx_hash) for i in items
        ]
        await self.ledger.run(
            self.ledger.sync.record_batch_sent, batch, events, self._now_ms(), lease_epoch
        )
        for item, event in zip(items, events, strict=True):
            self.tracker.apply(item, event)
        self.tracker.batches_sent += 1
        self.tracker.changed.set()

    async def replacement(self, batch_id: int, tx_hash: str, raw_tx: bytes) -> None:
        """Write-ahead for a fee-bumped replacement of a sent batch."""
        await self.ledger.run(
            self.ledger.sync.record_replacement, batch_id, tx_hash, raw_tx, self._now_ms()
        )

    async def batch_final(
        self, event: BatchEvent, pairs: Sequence[tuple[PendingItem, PaymentEvent]]
    ) -> None:
        events = [e for _, e in pairs]
        await self.ledger.run(self.ledger.sync.record_batch_final, event, events, self._now_ms())
        for item, e in pairs:
            self.tracker.apply(item, e)
        if event.state == "mined":
            self.tracker.batches_mined += 1
            self.tracker.changed.set()
            self.tracker.items_in_mined_batches += len(pairs)
            self.tracker.gas_used += event.gas_used or 0
            self.tracker.fee_wei += (event.gas_used or 0) * (event.effective_gas_price or 0)
