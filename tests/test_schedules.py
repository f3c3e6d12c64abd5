"""Deferred settlement policies: windows, UTC schedules, thresholds, per-payee pools, and the
deadline rule that overrides all of them. Time is injected (MockClock or plain numbers)."""

from __future__ import annotations

import calendar
import os

import msgspec
import pytest
import trio
import trio.testing

from engine.clock import TrioWallClock
from engine.config import (
    ConfigError,
    EngineConfig,
    PayeeScheduleConfig,
    PolicyConfig,
    parse_utc_times,
    validate,
)
from engine.model import Batch, Payment, PendingItem
from engine.rules.policy import (
    ImmediatePolicy,
    Limits,
    PendingPool,
    PoolView,
    ScheduledPolicy,
    Thresholds,
    WindowedPolicy,
    plan,
    schedule_policy,
)
from engine.stages.batch import BatchStage

# 2027-01-05 15:20:00 UTC
START = float(calendar.timegm((2027, 1, 5, 15, 20, 0)))
MIDNIGHT = float(calendar.timegm((2027, 1, 6, 0, 0, 0)))
LIMITS = Limits(
    max_batch_size=100,
    gas_per_tx_max=16_777_216,
    block_gas_limit=30_000_000,
    gas_per_item_estimate=40_000,
    deadline_margin_s=300,
)
PAYEE_A = b"\x0a" * 20
PAYEE_B = b"\x0b" * 20


def _item(
    i: int,
    *,
    arrived: float = START,
    valid_for_s: float = 7 * 86_400,
    payee: bytes = PAYEE_A,
    payer: bytes | None = None,
    value: int = 1000,
) -> PendingItem:
    p = Payment(
        chain_id=1,
        token=b"\x01" * 20,
        payer=payer or os.urandom(20),
        payee=payee,
        value=value,
        valid_after=int(START) - 100,
        valid_before=int(arrived + valid_for_s),
        nonce=os.urandom(32),
        signature=b"\x00" * 65,
        network="base",
        x402_version=2,
    )
    return PendingItem(i, p, arrived)


def _view(count: int, oldest: float | None, value: int = 0, payer_max: int = 0) -> PoolView:
    return PoolView(count, oldest, value, payer_max)


def test_window_boundaries_are_aligned_to_the_epoch() -> None:
    hourly = WindowedPolicy(3600)
    assert hourly.next_firing(START) == START + 40 * 60  # 15:20 -> 16:00
    assert hourly.next_firing(START + 40 * 60) == START + 100 * 60  # on a boundary: the next
    view = _view(3, START)
    assert not hourly.due(view, LIMITS, START + 39 * 60)
    assert hourly.due(view, LIMITS, START + 40 * 60)
    assert hourly.wake_at(view, LIMITS, START) == START + 40 * 60
    assert not hourly.due(_view(100, START), LIMITS, START)  # full batches wait for it too
    assert not hourly.due(_view(0, None), LIMITS, START + 10 * 3600)


def test_schedule_fires_at_the_next_utc_time_and_rolls_over_midnight() -> None:
    daily = ScheduledPolicy(["00:00"])
    assert daily.next_firing(START) == MIDNIGHT
    twice = ScheduledPolicy(["18:30", "06:00"])
    assert twice.next_firing(START) == MIDNIGHT - 5.5 * 3600  # 18:30 the same day
    assert twice.next_firing(MIDNIGHT - 5.5 * 3600) == MIDNIGHT + 6 * 3600  # then 06:00
    view = _view(5, START)
    assert not daily.due(view, LIMITS, MIDNIGHT - 1)
    assert daily.due(view, LIMITS, MIDNIGHT)
    assert daily.wake_at(view, LIMITS, START) == MIDNIGHT


@pytest.mark.parametrize("bad", [[], ["24:00"], ["7:5"], ["noon"], ["12:60"]])
def test_bad_times_of_day_are_refused(bad: list[str]) -> None:
    with pytest.raises(ValueError):
        parse_utc_times(bad)


def test_thresholds_trigger_early_and_otherwise_defer_to_the_schedule() -> None:
    daily = ScheduledPolicy(["00:00"])
    by_value = Thresholds(daily, value_min=10_000)
    assert by_value.due(_view(3, START, value=10_000), LIMITS, START)
    assert not by_value.due(_view(3, START, value=9_999), LIMITS, START)
    assert Thresholds(daily, count_min=3).due(_view(3, START), LIMITS, START)
    by_payer = Thresholds(daily, payer_value_max=5_000)
    assert by_payer.due(_view(9, START, value=9_000, payer_max=5_000), LIMITS, START)
    assert not by_payer.due(_view(9, START, value=9_000, payer_max=4_999), LIMITS, START)
    assert by_payer.due(_view(9, START, payer_max=1), LIMITS, MIDNIGHT)  # the schedule still fires
    assert by_payer.wake_at(_view(9, START), LIMITS, START) == MIDNIGHT


def test_pool_tracks_each_payers_unsettled_value() -> None:
    pool = PendingPool(track_payer_max=True)
    payer = b"\x77" * 20
    pool.add(_item(1, payer=payer, value=300), START)
    pool.add(_item(2, payer=payer, value=400), START)
    pool.add(_item(3, value=500), START)
    assert pool.view().payer_value_max == 700 and pool.payer_value(payer) == 700
    pool.take([1])
    assert pool.view().payer_value_max == 500 and pool.payer_value(payer) == 400
    pool.take([2, 3])
    assert pool.view().payer_value_max == 0 and pool.payer_value(payer) == 0


def test_deadline_overrides_a_daily_schedule() -> None:
    pool = PendingPool()
    daily = ScheduledPolicy(["00:00"])
    pool.add(_item(1), START)
    pool.add(_item(2, valid_for_s=3600), START)  # expires 16:20, long before midnight
    decision = plan(pool, daily, LIMITS, START)
    assert decision.batch == [] and decision.wake_at == START + 3600 - 300  # deadline - margin
    decision = plan(pool, daily, LIMITS, START + 3600 - 300)
    assert [i.id for i in decision.batch] == [2, 1]  # the urgent one, and the rest along


def test_schedule_policy_is_built_from_configuration() -> None:
    built = schedule_policy(
        PayeeScheduleConfig(
            payee="0x" + "aa" * 20, mode="windowed", window_s=60, count_threshold=5
        ),
        0.5,
    )
    assert isinstance(built, Thresholds) and isinstance(built.inner, WindowedPolicy)
    assert isinstance(schedule_policy(PolicyConfig(), 0.5), ImmediatePolicy)


def test_configuration_refuses_bad_schedules(offline_config: EngineConfig) -> None:
    def with_policy(policy: PolicyConfig) -> EngineConfig:
        return msgspec.structs.replace(offline_config, policy=policy)

    with pytest.raises(ConfigError, match="times_utc"):
        validate(with_policy(PolicyConfig(mode="scheduled", times_utc=["25:00"])))
    with pytest.raises(ConfigError, match="payee"):
        validate(with_policy(PolicyConfig(payees=[PayeeScheduleConfig(payee="0x12")])))
    twice = PayeeScheduleConfig(payee="0x" + "aa" * 20)
    with pytest.raises(ConfigError, match="twice"):
        validate(with_policy(PolicyConfig(payees=[twice, twice])))
    with pytest.raises(ConfigError, match="window_s"):
        validate(with_policy(PolicyConfig(mode="windowed", window_s=0)))
    validate(with_policy(PolicyConfig(payees=[twice])))
    too_short = msgspec.structs.replace(offline_config.ingest, valid_before_margin_s=4)
    with pytest.raises(ConfigError, match="valid_before_margin_s"):
        # An authorization accepted with 4 s left could never be sent (send margin).
        validate(msgspec.structs.replace(offline_config, ingest=too_short))


async def test_payees_with_schedules_of_their_own_settle_on_them(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Payee A settles at midnight UTC, payee B hourly, everyone else immediately; an item of A's
    that expires at 16:20 still leaves at 16:15 (deadline minus margin)."""
    clock = TrioWallClock(START)
    out_send, out_recv = trio.open_memory_channel[Batch](10)
    new_send, new_recv = trio.open_memory_channel[list[PendingItem]](10)
    requeue_send, requeue_recv = trio.open_memory_channel[list[PendingItem]](10)
    stage = BatchStage(
        1,
        ImmediatePolicy(max_wait_s=1),
        LIMITS,
        clock,
        out_send,
        payee_policies={PAYEE_A: ScheduledPolicy(["00:00"]), PAYEE_B: WindowedPolicy(3600)},
    )
    seen: list[tuple[float, list[int]]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stage.run, new_recv, requeue_recv)
        other = b"\x0c" * 20
        await new_send.send(
            [
                _item(1, payee=PAYEE_A),
                _item(2, payee=PAYEE_B),
                _item(3, payee=other),
                _item(4, payee=PAYEE_A, valid_for_s=3600),
                _item(5, payee=PAYEE_A),
            ]
        )
        for k in range(3):
            batch = await out_recv.receive()
            seen.append((clock.now() - START, [i.id for i in batch.items]))
            if k == 0:  # the shared pool is empty, the scheduled payees' pools wait
                assert stage.depth_by_payee() == {PAYEE_A: 3, PAYEE_B: 1, None: 0}
        await new_send.send([_item(6, arrived=clock.now(), payee=PAYEE_A)])
        batch = await out_recv.receive()
        seen.append((clock.now() - START, [i.id for i in batch.items]))
        nursery.cancel_scope.cancel()
    assert [ids for _, ids in seen] == [[3], [2], [4, 1, 5], [6]]
    expected_s = [1, 40 * 60, 55 * 60, MIDNIGHT - START]  # +1 s, 16:00, 16:15, 00:00
    assert all(abs(t - e) < 0.01 for (t, _), e in zip(seen, expected_s, strict=True)), seen
    del requeue_send
