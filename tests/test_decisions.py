"""The settlement decisions as pure functions: what a planned batch still sends, what to do
with a batch without a receipt, when and how to replace a stuck one, whose transfer a used
nonce was."""

from __future__ import annotations

import os
from typing import Any

from engine.chain import codec
from engine.chain.codec import Log, Receipt
from engine.model import Payment, PendingItem
from engine.rules.fees import Fees, bump_fees
from engine.stages.confirm import Unseen, unseen_action
from engine.stages.submit import ATTEMPTS_MAX, triage


def _item(i: int, valid_before: int, attempts: int = 0) -> PendingItem:
    p = Payment(
        8453,
        b"\x11" * 20,
        os.urandom(20),
        b"\x22" * 20,
        5,
        0,
        valid_before,
        os.urandom(32),
        os.urandom(65),
        "base",
        2,
    )
    return PendingItem(i, p, 0.0, attempts)


def test_triage_fails_the_late_and_the_exhausted_and_counts_an_attempt() -> None:
    now = 1_000
    out = triage(
        [_item(1, now + 1), _item(2, now + 600, ATTEMPTS_MAX), _item(3, now + 600, 1)], now
    )
    assert [i.id for i in out.late] == [1]
    assert [i.id for i in out.exhausted] == [2]
    assert [(i.id, i.attempts) for i in out.send] == [(3, 2)]


def test_unseen_batch_waits_rebroadcasts_or_is_declared_dead() -> None:
    base: dict[str, Any] = {"rebroadcast_after_s": 6.0, "confirmations": 1}
    assert (
        unseen_action(
            now=10, last_broadcast=5, nonce_spent=False, head=None, spent_first_seen=None, **base
        )
        is Unseen.WAIT
    )
    assert (
        unseen_action(
            now=12, last_broadcast=5, nonce_spent=False, head=None, spent_first_seen=None, **base
        )
        is Unseen.REBROADCAST
    )
    assert (
        unseen_action(
            now=12, last_broadcast=5, nonce_spent=True, head=101, spent_first_seen=100, **base
        )
        is Unseen.WAIT
    )  # a node may lag
    assert (
        unseen_action(
            now=12, last_broadcast=5, nonce_spent=True, head=103, spent_first_seen=100, **base
        )
        is Unseen.DEAD
    )


def test_fee_bump_only_when_stuck_by_at_least_an_eighth_and_never_above_the_cap() -> None:
    sent = Fees(2_000, 100)
    assert bump_fees(sent, base_fee=1_000, priority_fee=100, max_fee_cap=10**9) is None
    bumped = bump_fees(sent, base_fee=5_000, priority_fee=100, max_fee_cap=10**9)
    assert bumped == Fees(2 * 5_000 + 113, 113)
    capped = bump_fees(sent, base_fee=5_000, priority_fee=100, max_fee_cap=3_000)
    assert capped == Fees(3_000, 113)  # under the cap, still a valid replacement
    assert bump_fees(sent, base_fee=5_000, priority_fee=100, max_fee_cap=2_200) is None


def test_a_used_nonce_is_this_payment_only_with_its_exact_transfer() -> None:
    token, payer, payee = b"\x11" * 20, b"\x01" * 20, b"\x02" * 20

    def receipt(to: bytes, value: int, status: str = "0x1") -> Receipt:
        log = Log(
            "0x" + token.hex(),
            [
                "0x" + codec.TRANSFER.hex(),
                "0x" + payer.rjust(32, b"\0").hex(),
                "0x" + to.rjust(32, b"\0").hex(),
            ],
            "0x" + value.to_bytes(32, "big").hex(),
        )
        return Receipt("0xabc", "0x5", "0xdef", status, "0x1", logs=[log])

    assert codec.transfer_in_receipt(receipt(payee, 7), token, payer, payee, 7)
    assert not codec.transfer_in_receipt(receipt(payee, 8), token, payer, payee, 7)  # rival
    assert not codec.transfer_in_receipt(receipt(b"\x03" * 20, 7), token, payer, payee, 7)
    assert not codec.transfer_in_receipt(receipt(payee, 7, "0x0"), token, payer, payee, 7)
