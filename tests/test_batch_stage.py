"""The batch stage under trio's MockClock: flush timing follows the injected clock."""

from __future__ import annotations

import os

import trio
import trio.testing

from engine.clock import TrioWallClock
from engine.model import Batch, Payment, PendingItem
from engine.rules.policy import ImmediatePolicy, Limits
from engine.stages.batch import BatchStage

START = 1_800_000_000.0
LIMITS = Limits(
    max_batch_size=100,
    gas_per_tx_max=16_777_216,
    block_gas_limit=30_000_000,
    gas_per_item_estimate=40_000,
    deadline_margin_s=30,
)


def _item(i: int, valid_before: int, valid_after: int = int(START) - 100) -> PendingItem:
    p = Payment(
        chain_id=1,
        token=b"\x01" * 20,
        payer=os.urandom(20),
        payee=b"\x02" * 20,
        value=1,
        valid_after=valid_after,
        valid_before=valid_before,
        nonce=os.urandom(32),
        signature=b"\x00" * 65,
        network="base",
        x402_version=2,
    )
    return PendingItem(i, p, START)


async def test_partial_batch_flushes_after_max_wait_and_early_deadline_first(
    autojump_clock: trio.testing.MockClock,
) -> None:
    clock = TrioWallClock(START)
    out_send, out_recv = trio.open_memory_channel[Batch](10)
    new_send, new_recv = trio.open_memory_channel[list[PendingItem]](10)
    requeue_send, requeue_recv = trio.open_memory_channel[list[PendingItem]](10)
    stage = BatchStage(1, ImmediatePolicy(max_wait_s=60), LIMITS, clock, out_send)
    seen: list[tuple[float, list[int]]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stage.run, new_recv, requeue_recv)
        far = int(START) + 3600
        await new_send.send([_item(1, far), _item(2, far)])
        # validBefore in 40 s: with a 30 s margin it must go at START + 10 s, long before the
        # 60 s max wait, and take the two waiting items along.
        await new_send.send([_item(3, int(START) + 40)])
        # validAfter in the future: must not be sent before START + 121.
        await new_send.send([_item(4, far, valid_after=int(START) + 120)])
        for _ in range(2):
            batch = await out_recv.receive()
            seen.append((clock.now() - START, [i.id for i in batch.items]))
        nursery.cancel_scope.cancel()
    (t1, first), (t2, second) = seen
    assert abs(t1 - 10) < 0.01 and first == [3, 1, 2]
    assert abs(t2 - 121) < 0.01 and second == [4]
    del requeue_send


async def test_settle_now_covers_payments_accepted_before_it_but_still_in_transit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A sweep right after an acknowledgement: the payment may still be on its way from the
    intake stage; it belongs to the sweep all the same (the hour-long wait does not apply)."""
    clock = TrioWallClock(START)
    out_send, out_recv = trio.open_memory_channel[Batch](10)
    new_send, new_recv = trio.open_memory_channel[list[PendingItem]](10)
    requeue_send, requeue_recv = trio.open_memory_channel[list[PendingItem]](10)
    stage = BatchStage(1, ImmediatePolicy(max_wait_s=3600), LIMITS, clock, out_send)
    far = int(START) + 7200
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stage.run, new_recv, requeue_recv)
        await trio.sleep(5)
        assert stage.settle_now() == 0  # nothing arrived yet ...
        await new_send.send([_item(1, far)])  # ... but this one was accepted at START
        batch = await out_recv.receive()
        assert clock.now() - START < 6 and [i.id for i in batch.items] == [1]
        later = PendingItem(2, _item(2, far).payment, clock.now() + 1)  # after the sweep
        await new_send.send([later])
        with trio.move_on_after(600):
            await out_recv.receive()
            raise AssertionError("a payment accepted after the sweep waits for its policy")
        nursery.cancel_scope.cancel()
    del requeue_send
