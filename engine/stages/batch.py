"""The batch stage (one per chain): pending pools per token, planned by the batching policy.

A payee with a policy of its own (``payee_policies``: windowed, scheduled, thresholds) gets pools
of its own, planned by that policy; every other payee shares the token's pool and the default
policy. The deadline rule of :func:`engine.rules.policy.plan` applies to every pool.

Three tasks share the pools: one takes newly accepted payments (and stops taking them while
the pools hold ``pool_max`` items: backpressure), one takes payments handed back by the submit
and confirm stages (never blocked, so those stages cannot deadlock against this one), and one
plans and sends batches to the submit stage.
"""

from __future__ import annotations

import math

import trio

from ..clock import Clock, Wakeup
from ..model import Batch, PendingItem
from ..rules.policy import (
    BatchPolicy,
    ImmediatePolicy,
    Limits,
    PendingPool,
    Plan,
    needs_payer_max,
    plan,
)

_NOW = ImmediatePolicy(0.0)  # due whenever anything is ready


class BatchStage:
    def __init__(
        self,
        chain_id: int,
        policy: BatchPolicy,
        limits: Limits,
        clock: Clock,
        send: trio.MemorySendChannel[Batch],
        pool_max: int = 1_000_000,
        payee_policies: dict[bytes, BatchPolicy] | None = None,
    ) -> None:
        self.chain_id = chain_id
        self._policy = policy
        self._limits = limits
        self._clock = clock
        self._send = send
        self._pool_max = pool_max
        self._payee_policies = dict(payee_policies or {})
        # (token, payee with its own policy, or None for the shared pool) -> pool
        self._pools: dict[tuple[bytes, bytes | None], PendingPool] = {}
        self._changed = Wakeup()
        self._space = Wakeup()
        # pool -> payers whose ready items are to be settled now, whatever the schedule
        self._expedite: dict[tuple[bytes, bytes | None], set[bytes]] = {}
        self._drain: set[tuple[bytes, bytes | None]] = set()  # pools to empty now (settle_now)
        # settle_now also covers payments accepted before it but still on their way here
        self._swept_until = -math.inf
        self._payee_swept_until: dict[bytes, float] = {}
        self._own = frozenset(self._payee_policies)
        self.batches_planned = 0
        self.blocked_since: float | None = None  # a planned batch waits for the submit stage

    def depth(self) -> int:
        return sum(len(p) for p in self._pools.values())

    def expedite(self, token: bytes, payers: set[bytes]) -> int:
        """Settle the ready payments of ``payers`` in ``token`` now, whatever the schedule (a payer
        whose balance fell below what they owe); returns how many pools hold some."""
        found = 0
        for key, pool in self._pools.items():
            owing = {p for p in payers if pool.payer_value(p)}
            if key[0] == token and owing:
                self._expedite.setdefault(key, set()).update(owing)
                found += 1
        if found:
            self._changed.set()
        return found

    def settle_now(self, payee: bytes | None = None) -> int:
        """Send every waiting payment (of ``payee``, or all) now, whatever the schedules, as
        back-to-back full batches; returns how many were waiting."""
        now = self._clock.now()
        if payee is None:
            self._swept_until = now
        else:
            self._payee_swept_until[payee] = now
        waiting = 0
        for key, pool in self._pools.items():
            if payee is None or key[1] == payee or (key[1] is None and payee not in self._own):
                self._drain.add(key)
                waiting += len(pool)
        self._changed.set()
        return waiting

    def depth_by_payee(self) -> dict[bytes | None, int]:
        """Unbatched items per payee with its own policy (None: the shared pools)."""
        out: dict[bytes | None, int] = {None: 0, **dict.fromkeys(self._payee_policies, 0)}
        for (_, payee), pool in self._pools.items():
            out[payee] = out.get(payee, 0) + len(pool)
        return out

    def preload(self, items: list[PendingItem]) -> None:
        """Queue recovered payments before the stage starts."""
        self._add(items)

    async def run(
        self,
        new_items: trio.MemoryReceiveChannel[list[PendingItem]],
        requeued: trio.MemoryReceiveChannel[list[PendingItem]],
    ) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._take, new_items, True)
            nursery.start_soon(self._take, requeued, False)
            nursery.start_soon(self._flush)

    def _add(self, items: list[PendingItem]) -> None:
        now = self._clock.now()
        own = self._payee_policies
        for item in items:
            payee = item.payment.payee
            key = (item.payment.token, payee if payee in own else None)
            pool = self._pools.get(key)
            if pool is None:
                pool = self._pools[key] = PendingPool(needs_payer_max(self._policy_for(key)))
            pool.add(item, now)
            cutoff = max(self._swept_until, self._payee_swept_until.get(payee, -math.inf))
            if item.arrived_at <= cutoff:  # accepted before a settle_now: part of that sweep
                self._drain.add(key)
        self._changed.set()

    async def _take(
        self, receive: trio.MemoryReceiveChannel[list[PendingItem]], bounded: bool
    ) -> None:
        async with receive:
            async for items in receive:
                self._add(items)
                while bounded and self.depth() >= self._pool_max:
                    await self._space.wait()

    def _policy_for(self, key: tuple[bytes, bytes | None]) -> BatchPolicy:
        payee = key[1]
        return self._policy if payee is None else self._payee_policies[payee]

    def _decide(self, key: tuple[bytes, bytes | None], pool: PendingPool, now: float) -> Plan:
        """The next batch of one pool: a short payer's payments first (expedite), then the
        pool's policy, or everything if the pool is being drained (settle_now)."""
        early = self._expedite.get(key)
        if early is not None:
            ids = pool.payer_ids(early, self._limits.items_per_batch_max)
            if ids:
                return Plan(pool.take(ids), now)
            del self._expedite[key]
        policy = self._policy_for(key)
        if key in self._drain:
            if len(pool) == 0:
                self._drain.discard(key)
            else:
                policy = _NOW
        return plan(pool, policy, self._limits, now)

    async def _flush(self) -> None:
        async with self._send:
            while True:
                wake = math.inf
                sent = False
                for key, pool in list(self._pools.items()):
                    decision = self._decide(key, pool, self._clock.now())
                    if decision.batch:
                        self.batches_planned += 1
                        self.blocked_since = self._clock.now()
                        await self._send.send(Batch(key[0], decision.batch))
                        self.blocked_since = None
                        self._space.set()
                        sent = True
                    if decision.wake_at is not None:
                        wake = min(wake, decision.wake_at)
                if sent:
                    continue  # plan again at once: more may be due
                delay = wake - self._clock.now()
                with trio.move_on_after(max(delay, 0.001)):
                    await self._changed.wait()
