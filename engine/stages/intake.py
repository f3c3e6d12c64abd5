"""The intake stage: group commit of accepted payments.

``submit`` admits each verified, deduplicated payment into the open group and waits for that
group's commit. The stage takes the oldest group, writes it to DuckDB as one Arrow batch in one
commit, wakes every submitter of the group at once (their payments are now durable), then
forwards the group to the chains' batch stages. One event per group rather than a channel
message and an event per payment keeps the per-payment cost of durability small.

Bounded: at most ``groups_max`` groups of ``group_max`` payments wait; further submitters wait
for room (backpressure), as do all of them when a downstream batch stage is full.
"""

from __future__ import annotations

from collections import deque

import trio
import trio.lowlevel

from ..clock import Wakeup
from ..model import Clash, Payment, PendingItem
from ..outcomes import Tracker
from ..store.ledger import AsyncLedger


class IntakeStopped(RuntimeError):
    """The engine stopped while the payment waited for its durable write."""


class Group:
    """Payments committed together; :meth:`wait_durable` returns once they are durable (or the
    write failed: ``error``)."""

    __slots__ = ("_waiters", "error", "finished", "items", "rivals")

    def __init__(self) -> None:
        self.items: list[PendingItem] = []
        self.finished = False
        self.error: BaseException | None = None
        # shared ledger: items not recorded as ours (another instance's key, over credit)
        self.rivals: dict[int, Clash] = {}
        self._waiters: list[trio.lowlevel.Task] = []

    async def wait_durable(self) -> None:
        """Wait for the group's write, and do not give up on cancellation: a submitter whose
        payment is queued is told its fate. (Cheaper than a shielded cancel scope per
        payment; the task is rescheduled by :meth:`finish`.)"""
        if self.finished:
            await trio.lowlevel.checkpoint()
            return
        self._waiters.append(trio.lowlevel.current_task())
        await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)

    def finish(self, error: BaseException | None = None) -> None:
        assert not self.finished
        self.finished = True
        self.error = error
        for task in self._waiters:
            trio.lowlevel.reschedule(task)
        self._waiters.clear()


class IntakeStage:
    def __init__(
        self,
        ledger: AsyncLedger,
        tracker: Tracker,
        batch_sends: dict[int, trio.MemorySendChannel[list[PendingItem]]],
        group_max: int,
        groups_max: int = 4,
        credit_limits: dict[int, int] | None = None,
    ) -> None:
        assert group_max >= 1 and groups_max >= 2
        self._ledger = ledger
        self._tracker = tracker
        self._batch_sends = batch_sends
        # shared ledger: record id -> the payer's credit limit, for the ledger to enforce
        # across instances (filled by the ingest stage, taken here)
        self._credit_limits = credit_limits if credit_limits is not None else {}
        self._group_max = group_max
        self._groups_max = groups_max
        self._groups: deque[Group] = deque()
        self._open: Group | None = None  # the group new payments join
        self._arrived = Wakeup()
        self._room = Wakeup()
        self.groups_written = 0

    def waiting(self) -> int:
        return sum(len(g.items) for g in self._groups)

    def has_room(self) -> bool:
        open_has_space = self._open is not None and len(self._open.items) < self._group_max
        return open_has_space or len(self._groups) < self._groups_max

    async def wait_for_room(self) -> None:
        """Backpressure: wait until :meth:`admit` can take a payment."""
        while not self.has_room():
            await self._room.wait()

    def admit(self, item: PendingItem) -> Group:
        """Add ``item`` to the open group (call right after :meth:`wait_for_room`, with no
        checkpoint in between); returns the group, whose :meth:`Group.wait_durable` tells when
        the payment is durable."""
        assert self.has_room()
        group = self._open
        if group is None or len(group.items) >= self._group_max:
            group = self._open = Group()
            self._groups.append(group)
        group.items.append(item)
        self._arrived.set()
        return group

    async def run(self) -> None:
        current: Group | None = None
        try:
            while True:
                if not self._groups:
                    await self._arrived.wait()
                    continue
                current = self._groups.popleft()
                if current is self._open:
                    self._open = None  # close it: later payments start a new group
                self._room.set()
                await self._commit(current)
        finally:
            # Stopping: nobody may wait forever. A group cut off mid-write may be in the journal
            # (then it settles after the next start; resubmitting it returns its id).
            stopped = IntakeStopped("the engine stopped before this payment was acknowledged")
            for group in [current, *self._groups]:
                if group is not None and not group.finished:
                    group.finish(stopped)
            self._groups.clear()
            self._open = None

    async def _commit(self, group: Group) -> None:
        rows: list[tuple[int, Payment, int]] = [
            (i.id, i.payment, int(i.arrived_at * 1000)) for i in group.items
        ]
        limits = self._credit_limits
        credit = {i.id: limits.pop(i.id) for i in group.items if i.id in limits}
        try:
            group.rivals = await self._ledger.record_accepted(rows, credit)
        except Exception as exc:  # disk full, I/O error: every submitter in the group is told
            group.finish(exc)
            return
        self.groups_written += 1
        by_chain: dict[int, list[PendingItem]] = {}
        accepted = [i for i in group.items if i.id not in group.rivals]  # rivals: not ours
        for item in accepted:
            self._tracker.track(item)
            by_chain.setdefault(item.payment.chain_id, []).append(item)
        self._tracker.accepted += len(accepted)
        group.finish()
        for chain_id, items in by_chain.items():
            await self._batch_sends[chain_id].send(items)
