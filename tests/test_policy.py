"""Batching policy and pending pool: pure logic, time passed in."""

from __future__ import annotations

import os

from engine.model import Payment, PendingItem
from engine.rules.policy import ImmediatePolicy, Limits, PendingPool, plan

NOW = 1_800_000_000.0
LIMITS = Limits(
    max_batch_size=10,
    gas_per_tx_max=16_777_216,
    block_gas_limit=30_000_000,
    gas_per_item_estimate=50_000,
    deadline_margin_s=30,
)


def _item(
    i: int, *, arrived: float = NOW, valid_after: int = 0, valid_before: int = 0
) -> PendingItem:
    p = Payment(
        chain_id=1,
        token=b"\x01" * 20,
        payer=os.urandom(20),
        payee=b"\x02" * 20,
        value=10,
        valid_after=valid_after or int(NOW) - 100,
        valid_before=valid_before or int(NOW) + 3600,
        nonce=os.urandom(32),
        signature=b"\x00" * 65,
        network="base",
        x402_version=2,
    )
    return PendingItem(i, p, arrived)


def test_flushes_when_full_and_not_before_max_wait() -> None:
    pool, policy = PendingPool(), ImmediatePolicy(max_wait_s=1.0)
    for i in range(5):
        pool.add(_item(i), NOW)
    first = plan(pool, policy, LIMITS, NOW + 0.5)
    assert first.batch == [] and first.wake_at == NOW + 1.0
    later = plan(pool, policy, LIMITS, NOW + 1.0)
    assert [x.id for x in later.batch] == [0, 1, 2, 3, 4]
    for i in range(25):
        pool.add(_item(100 + i), NOW + 2)
    full = plan(pool, policy, LIMITS, NOW + 2)
    assert len(full.batch) == 10 and len(pool) == 15


def test_batch_never_exceeds_gas_cap() -> None:
    limits = Limits(1000, 1_000_000, 30_000_000, 100_000, 30)
    assert limits.items_per_batch_max == 9  # (1,000,000 - 60,000) // 100,000
    pool = PendingPool()
    for i in range(50):
        pool.add(_item(i), NOW)
    batch = plan(pool, ImmediatePolicy(0), limits, NOW).batch
    assert len(batch) == 9


def test_item_waits_until_valid_after_has_passed() -> None:
    pool, policy = PendingPool(), ImmediatePolicy(0)
    pool.add(_item(1, valid_after=int(NOW) + 10), NOW)
    decision = plan(pool, policy, LIMITS, NOW)
    assert decision.batch == [] and decision.wake_at == NOW + 11
    assert [x.id for x in plan(pool, policy, LIMITS, NOW + 11).batch] == [1]


def test_deadline_forces_flush_before_max_wait_and_goes_first() -> None:
    pool, policy = PendingPool(), ImmediatePolicy(max_wait_s=3600)
    for i in range(5):
        pool.add(_item(i), NOW)
    pool.add(_item(99, valid_before=int(NOW) + 100), NOW)
    decision = plan(pool, policy, LIMITS, NOW)
    assert decision.batch == [] and decision.wake_at == NOW + 70  # 100 s - 30 s margin
    forced = plan(pool, policy, LIMITS, NOW + 70)
    assert forced.batch[0].id == 99 and len(forced.batch) == 6


def test_empty_pool_sleeps_until_woken() -> None:
    decision = plan(PendingPool(), ImmediatePolicy(1.0), LIMITS, NOW)
    assert decision.batch == [] and decision.wake_at is None


class NeverDue:
    """A policy that never flushes on its own (as a far-off schedule would)."""

    def due(self, view: object, limits: Limits, now: float) -> bool:
        return False

    def wake_at(self, view: object, limits: Limits, now: float) -> float | None:
        return None


def test_deadlines_are_kept_whatever_the_policy_says() -> None:
    pool = PendingPool()
    pool.add(_item(1), NOW)
    pool.add(_item(2, valid_before=int(NOW) + 500), NOW)
    decision = plan(pool, NeverDue(), LIMITS, NOW)
    assert decision.batch == [] and decision.wake_at == NOW + 470
    # The urgent item goes first; the rest of the batch is filled from the pool.
    assert [x.id for x in plan(pool, NeverDue(), LIMITS, NOW + 470).batch] == [2, 1]
