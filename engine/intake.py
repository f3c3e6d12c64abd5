"""The intake stage: group commit of accepted payments.

``submit`` hands each verified, deduplicated payment to this stage and waits. The stage takes
everything queued (up to ``group_max``), writes it to DuckDB as one Arrow batch in one commit,
wakes the submitters (now their payments are durable), then forwards the group to the chains'
batch stages. A full downstream channel blocks this stage and, through its bounded input
channel, the submitters: backpressure instead of unbounded queues.
"""

from __future__ import annotations

import trio

from .ledger import AsyncLedger
from .model import Payment
from .outcomes import Tracker
from .policy import PendingItem


class IntakeRequest:
    __slots__ = ("done", "error", "item")

    def __init__(self, item: PendingItem) -> None:
        self.item = item
        self.done = trio.Event()
        self.error: BaseException | None = None


class IntakeStage:
    def __init__(
        self,
        ledger: AsyncLedger,
        tracker: Tracker,
        batch_sends: dict[int, trio.MemorySendChannel[list[PendingItem]]],
        group_max: int,
    ) -> None:
        assert group_max >= 1
        self._ledger = ledger
        self._tracker = tracker
        self._batch_sends = batch_sends
        self._group_max = group_max
        self.groups_written = 0

    async def run(self, receive: trio.MemoryReceiveChannel[IntakeRequest]) -> None:
        async with receive:
            while True:
                try:
                    first = await receive.receive()
                except trio.EndOfChannel:
                    return
                group = [first]
                while len(group) < self._group_max:
                    try:
                        group.append(receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                await self._commit(group)

    async def _commit(self, group: list[IntakeRequest]) -> None:
        rows: list[tuple[int, Payment, int]] = [
            (r.item.id, r.item.payment, int(r.item.arrived_at * 1000)) for r in group
        ]
        try:
            await self._ledger.run(self._ledger.sync.insert_payments, rows)
        except Exception as exc:  # disk full, I/O error: every submitter in the group is told
            for r in group:
                r.error = exc
                r.done.set()
            return
        self.groups_written += 1
        by_chain: dict[int, list[PendingItem]] = {}
        for r in group:
            self._tracker.track(r.item)
            self._tracker.accepted += 1
            r.done.set()
            by_chain.setdefault(r.item.payment.chain_id, []).append(r.item)
        for chain_id, items in by_chain.items():
            await self._batch_sends[chain_id].send(items)
