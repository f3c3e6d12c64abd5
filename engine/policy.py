"""Batching policy and the pending pool, as pure logic (no I/O, time passed in).

The pool holds accepted payments waiting for a batch. A pluggable :class:`BatchPolicy` says when
the pool is *due* (size, age, and later schedules or windows); independent of any policy, the
planner always flushes items whose deadline (validBefore minus a safety margin) has come, never
takes an item before its validAfter has passed, and never plans more items than fit the
per-transaction and block gas limits.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from typing import Protocol

import msgspec

from .model import Payment

BATCH_BASE_GAS = 60_000  # intrinsic gas + calldata head + loop set-up, planning figure


class PendingItem(msgspec.Struct, frozen=True, gc=False):
    id: int
    payment: Payment
    arrived_at: float  # unix seconds; for max-wait and latency
    attempts: int = 0  # batches this item has been planned into

    @property
    def ready_at(self) -> float:
        # The token requires block.timestamp > validAfter.
        return float(self.payment.valid_after + 1)

    @property
    def deadline(self) -> float:
        return float(self.payment.valid_before)


class PoolView(msgspec.Struct, frozen=True):
    """What a policy may look at: a small immutable snapshot."""

    ready_count: int
    oldest_arrival: float | None
    ready_value: int


class Limits(msgspec.Struct, frozen=True):
    max_batch_size: int
    gas_per_tx_max: int
    block_gas_limit: int
    gas_per_item_estimate: int
    deadline_margin_s: float

    @property
    def items_per_batch_max(self) -> int:
        gas_cap = min(self.gas_per_tx_max, self.block_gas_limit) - BATCH_BASE_GAS
        return max(1, min(self.max_batch_size, gas_cap // self.gas_per_item_estimate))


class BatchPolicy(Protocol):
    def due(self, view: PoolView, limits: Limits, now: float) -> bool:
        """Should the ready items be flushed now?"""

    def wake_at(self, view: PoolView, limits: Limits, now: float) -> float | None:
        """When might ``due`` next become true without new arrivals (None: never)."""


class ImmediatePolicy:
    """Flush when a batch is full or the oldest ready item has waited ``max_wait_s``."""

    def __init__(self, max_wait_s: float) -> None:
        assert max_wait_s >= 0
        self.max_wait_s = max_wait_s

    def due(self, view: PoolView, limits: Limits, now: float) -> bool:
        if view.ready_count == 0:
            return False
        if view.ready_count >= limits.items_per_batch_max:
            return True
        assert view.oldest_arrival is not None
        return view.oldest_arrival + self.max_wait_s <= now

    def wake_at(self, view: PoolView, limits: Limits, now: float) -> float | None:
        if view.oldest_arrival is None:
            return None
        return view.oldest_arrival + self.max_wait_s


class PendingPool:
    """Accepted payments not yet in a batch. Items whose validAfter has not passed wait apart."""

    def __init__(self) -> None:
        self._ready: dict[int, PendingItem] = {}  # insertion order = arrival order
        self._ready_value = 0
        self._waiting: list[tuple[float, int, PendingItem]] = []  # (ready_at, id, item)
        self._deadlines: list[tuple[float, int]] = []  # (deadline, id), lazy deletion

    def __len__(self) -> int:
        return len(self._ready) + len(self._waiting)

    @property
    def ready_count(self) -> int:
        return len(self._ready)

    def add(self, item: PendingItem, now: float) -> None:
        if item.ready_at > now:
            heapq.heappush(self._waiting, (item.ready_at, item.id, item))
        else:
            self._add_ready(item)

    def promote(self, now: float) -> None:
        while self._waiting and self._waiting[0][0] <= now:
            _, _, item = heapq.heappop(self._waiting)
            self._add_ready(item)

    def view(self) -> PoolView:
        oldest = next(iter(self._ready.values())).arrived_at if self._ready else None
        return PoolView(len(self._ready), oldest, self._ready_value)

    def earliest_deadline(self) -> float | None:
        while self._deadlines and self._deadlines[0][1] not in self._ready:
            heapq.heappop(self._deadlines)
        return self._deadlines[0][0] if self._deadlines else None

    def next_ready_at(self) -> float | None:
        return self._waiting[0][0] if self._waiting else None

    def take(self, ids: list[int]) -> list[PendingItem]:
        taken = [self._ready.pop(i) for i in ids]
        self._ready_value -= sum(t.payment.value for t in taken)
        return taken

    def urgent_ids(self, before: float, limit: int) -> list[int]:
        """Ids of ready items whose deadline is at or before ``before``, earliest first."""
        found: list[int] = []
        popped: list[tuple[float, int]] = []
        while self._deadlines and len(found) < limit:
            deadline, rid = self._deadlines[0]
            if rid not in self._ready:
                heapq.heappop(self._deadlines)
                continue
            if deadline > before:
                break
            popped.append(heapq.heappop(self._deadlines))
            found.append(rid)
        for entry in popped:  # keep them indexed until actually taken
            heapq.heappush(self._deadlines, entry)
        return found

    def fifo_ids(self, limit: int, skip: set[int]) -> Iterator[int]:
        count = 0
        for rid in self._ready:
            if count >= limit:
                return
            if rid not in skip:
                count += 1
                yield rid

    def _add_ready(self, item: PendingItem) -> None:
        self._ready[item.id] = item
        self._ready_value += item.payment.value
        heapq.heappush(self._deadlines, (item.deadline, item.id))


class Plan(msgspec.Struct, frozen=True):
    batch: list[PendingItem]  # empty: nothing to send now
    wake_at: float | None  # when to plan again if nothing arrives


def plan(pool: PendingPool, policy: BatchPolicy, limits: Limits, now: float) -> Plan:
    """Take the next batch from ``pool`` if one is due; otherwise say when to look again."""
    pool.promote(now)
    cap = limits.items_per_batch_max
    urgent = pool.urgent_ids(now + limits.deadline_margin_s, cap)
    view = pool.view()
    if urgent or policy.due(view, limits, now):
        skip = set(urgent)
        ids = urgent + list(pool.fifo_ids(cap - len(urgent), skip))
        return Plan(pool.take(ids), now)
    candidates = [
        policy.wake_at(view, limits, now),
        pool.next_ready_at(),
    ]
    deadline = pool.earliest_deadline()
    if deadline is not None:
        candidates.append(deadline - limits.deadline_margin_s)
    times = [t for t in candidates if t is not None]
    return Plan([], min(times) if times else None)
