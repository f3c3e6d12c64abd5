"""Batching policy and the pending pool, as pure logic (no I/O, time passed in).

The pool holds accepted payments waiting for a batch. A pluggable :class:`BatchPolicy` says when
the pool is *due*: :class:`ImmediatePolicy` (size or age), :class:`WindowedPolicy` (every N
seconds), :class:`ScheduledPolicy` (fixed UTC times of day), and :class:`Thresholds` on top of
any of them (accumulated value, count, one payer's unsettled value). Independent of any policy, the
planner always flushes items whose deadline (validBefore minus a safety margin) has come, never
takes an item before its validAfter has passed, and never plans more items than fit the
per-transaction and block gas limits.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator, Sequence
from typing import Protocol

import msgspec

from ..config import ScheduleConfig, parse_utc_times
from ..model import PendingItem

BATCH_BASE_GAS = 60_000  # intrinsic gas + calldata head + loop set-up, planning figure


class PoolView(msgspec.Struct, frozen=True):
    """What a policy may look at: a small immutable snapshot."""

    ready_count: int
    oldest_arrival: float | None
    ready_value: int
    payer_value_max: int = 0  # the largest unsettled value of one payer among ready items


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


_DAY_S = 86_400


class _TimedPolicy:
    """Due once the next firing time after the oldest ready arrival has come; stays due until
    the pool is empty (the sweep leaves as back-to-back full batches)."""

    def next_firing(self, after: float) -> float:
        """The first firing instant strictly after ``after`` (Unix seconds)."""
        raise NotImplementedError

    def due(self, view: PoolView, limits: Limits, now: float) -> bool:
        if view.ready_count == 0:
            return False
        assert view.oldest_arrival is not None
        return self.next_firing(view.oldest_arrival) <= now

    def wake_at(self, view: PoolView, limits: Limits, now: float) -> float | None:
        if view.oldest_arrival is None:
            return None
        return self.next_firing(view.oldest_arrival)


class WindowedPolicy(_TimedPolicy):
    """Settle what has accumulated every ``window_s`` seconds, on boundaries aligned to the Unix
    epoch (``window_s = 3600``: on the hour, UTC), plus ``offset_s``. The pool is due once a
    boundary has passed since its oldest ready item arrived, and stays due (batch after full
    batch) until it is empty; full batches wait for the boundary too (use ``count_threshold``
    to settle earlier)."""

    def __init__(self, window_s: float, offset_s: float = 0.0) -> None:
        assert window_s > 0 and 0 <= offset_s < window_s
        self.window_s = window_s
        self.offset_s = offset_s

    def next_firing(self, after: float) -> float:
        """The first window boundary strictly after ``after``."""
        k = math.floor((after - self.offset_s) / self.window_s) + 1
        return k * self.window_s + self.offset_s


class ScheduledPolicy(_TimedPolicy):
    """Settle at fixed UTC times of day (several allowed): the pool is due once a scheduled time
    has passed since its oldest ready item arrived, and the sweep leaves as back-to-back full
    batches until the pool is empty. Full batches wait for the schedule too."""

    def __init__(self, times_utc: Sequence[str]) -> None:
        self.times_s = parse_utc_times(times_utc)

    def next_firing(self, after: float) -> float:
        """The first scheduled instant strictly after ``after`` (Unix seconds)."""
        day = math.floor(after / _DAY_S) * _DAY_S
        for offset in self.times_s:
            if day + offset > after:
                return float(day + offset)
        return float(day + _DAY_S + self.times_s[0])


class Thresholds:
    """Any policy, plus early triggers: the pool is due as soon as its ready value reaches
    ``value_min``, its ready count reaches ``count_min``, or one payer's unsettled ready value
    reaches ``payer_value_max`` (a limit on credit extended to one payer). 0 turns one off."""

    def __init__(
        self, inner: BatchPolicy, value_min: int = 0, count_min: int = 0, payer_value_max: int = 0
    ) -> None:
        assert value_min >= 0 and count_min >= 0 and payer_value_max >= 0
        self.inner = inner
        self.value_min = value_min
        self.count_min = count_min
        self.payer_value_max = payer_value_max

    def due(self, view: PoolView, limits: Limits, now: float) -> bool:
        if view.ready_count == 0:
            return False
        return (
            (self.value_min > 0 and view.ready_value >= self.value_min)
            or (self.count_min > 0 and view.ready_count >= self.count_min)
            or (self.payer_value_max > 0 and view.payer_value_max >= self.payer_value_max)
            or self.inner.due(view, limits, now)
        )

    def wake_at(self, view: PoolView, limits: Limits, now: float) -> float | None:
        return self.inner.wake_at(view, limits, now)


def needs_payer_max(policy: BatchPolicy) -> bool:
    """Does ``policy`` read :attr:`PoolView.payer_value_max`?"""
    return isinstance(policy, Thresholds) and policy.payer_value_max > 0


def schedule_policy(schedule: ScheduleConfig, max_wait_s: float) -> BatchPolicy:
    """The policy a ``[policy]`` (or ``[[policy.payees]]``) section describes."""
    base: BatchPolicy
    if schedule.mode == "windowed":
        base = WindowedPolicy(schedule.window_s)
    elif schedule.mode == "scheduled":
        base = ScheduledPolicy(schedule.times_utc)
    else:
        base = ImmediatePolicy(max_wait_s)
    if schedule.value_threshold or schedule.count_threshold or schedule.payer_unsettled_threshold:
        return Thresholds(
            base,
            schedule.value_threshold,
            schedule.count_threshold,
            schedule.payer_unsettled_threshold,
        )
    return base


class PendingPool:
    """Accepted payments not yet in a batch. Items whose validAfter has not passed wait apart."""

    def __init__(self, track_payer_max: bool = False) -> None:
        # The largest single payer's value is kept up to date only for policies that look at
        # it (see needs_payer_max): it costs a heap push per payment.
        self._track_payer_max = track_payer_max
        self._ready: dict[int, PendingItem] = {}  # insertion order = arrival order
        self._ready_value = 0
        self._payer_value: dict[bytes, int] = {}
        # A lazy max-heap of (-value, payer): stale entries are skipped when read.
        self._payer_heap: list[tuple[int, bytes]] = []
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
        payer_max = self._payer_value_max() if self._track_payer_max else 0
        return PoolView(len(self._ready), oldest, self._ready_value, payer_max)

    def payer_value(self, payer: bytes) -> int:
        return self._payer_value.get(payer, 0)

    def _payer_value_max(self) -> int:
        heap = self._payer_heap
        while heap and self._payer_value.get(heap[0][1], 0) != -heap[0][0]:
            heapq.heappop(heap)
        if len(heap) > 4 * len(self._payer_value) + 64:  # keep stale entries bounded
            self._payer_heap = heap = [(-v, p) for p, v in self._payer_value.items()]
            heapq.heapify(heap)
        return -heap[0][0] if heap else 0

    def _add_payer_value(self, payer: bytes, delta: int) -> None:
        value = self._payer_value.get(payer, 0) + delta
        assert value >= 0
        if value:
            self._payer_value[payer] = value
            if self._track_payer_max:
                heapq.heappush(self._payer_heap, (-value, payer))
        else:
            self._payer_value.pop(payer, None)

    def earliest_deadline(self) -> float | None:
        while self._deadlines and self._deadlines[0][1] not in self._ready:
            heapq.heappop(self._deadlines)
        return self._deadlines[0][0] if self._deadlines else None

    def next_ready_at(self) -> float | None:
        return self._waiting[0][0] if self._waiting else None

    def take(self, ids: list[int]) -> list[PendingItem]:
        taken = [self._ready.pop(i) for i in ids]
        self._ready_value -= sum(t.payment.value for t in taken)
        for t in taken:
            self._add_payer_value(t.payment.payer, -t.payment.value)
        return taken

    def payer_ids(self, payers: set[bytes], limit: int) -> list[int]:
        """Ids of ready items of ``payers``, oldest first (a scan: for rare, early settlements)."""
        found: list[int] = []
        for rid, item in self._ready.items():
            if len(found) >= limit:
                break
            if item.payment.payer in payers:
                found.append(rid)
        return found

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
        self._add_payer_value(item.payment.payer, item.payment.value)
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
