from __future__ import annotations

import os

import msgspec

from engine.model import Payment
from engine.stages.dedup import Claim, DedupIndex


def _payment(valid_before: int = 2_000_000_000) -> Payment:
    return Payment(
        chain_id=8453,
        token=b"\x01" * 20,
        payer=os.urandom(20),
        payee=b"\x02" * 20,
        value=10,
        valid_after=0,
        valid_before=valid_before,
        nonce=os.urandom(32),
        signature=os.urandom(65),
        network="base",
        x402_version=2,
    )


def test_identical_authorization_is_idempotent_and_different_one_conflicts() -> None:
    index = DedupIndex()
    p = _payment()
    assert index.claim(p, 1) == (Claim.NEW, 1)
    assert index.claim(p, 2) == (Claim.SAME, 1)
    other = msgspec.structs.replace(p, value=11)
    assert index.claim(other, 3) == (Claim.CONFLICT, 1)
    assert index.peek(other) is Claim.CONFLICT
    assert len(index) == 1


def test_same_nonce_on_another_chain_or_token_is_independent() -> None:
    index = DedupIndex()
    p = _payment()
    index.claim(p, 1)
    assert index.claim(msgspec.structs.replace(p, chain_id=1), 2)[0] is Claim.NEW
    assert index.claim(msgspec.structs.replace(p, token=b"\x09" * 20), 3)[0] is Claim.NEW


def test_release_and_expiry_forget_keys() -> None:
    index = DedupIndex()
    a, b = _payment(valid_before=100), _payment(valid_before=10_000)
    index.claim(a, 1)
    index.claim(b, 2)
    assert index.evict_expired(now=150, grace_s=60) == 0
    # Keys are kept in one-minute buckets: forgotten within a minute after validBefore + grace.
    assert index.evict_expired(now=100 + 60 + 60, grace_s=60) == 1
    assert index.peek(a) is Claim.NEW and index.peek(b) is Claim.SAME
    index.release(b, 2)
    assert index.peek(b) is Claim.NEW


def test_a_payment_is_sold_once_and_the_mark_survives_a_restore() -> None:
    index = DedupIndex()
    p = _payment()
    assert index.claim(p, 7) == (Claim.NEW, 7)
    assert not index.is_sold(p)
    assert index.mark_sold(p) is True
    assert index.mark_sold(p) is False  # the second seller loses
    assert index.is_sold(p) and index.lookup(p) == (Claim.SAME, 7)
    assert index.claim(p, 8) == (Claim.SAME, 7)  # the owner id is intact beside the bit
    index.unmark_sold(p)
    assert not index.is_sold(p) and index.mark_sold(p) is True
    restored = DedupIndex()
    restored.restore(p, 7, sold=True)
    assert restored.is_sold(p) and restored.lookup(p) == (Claim.SAME, 7)
    other = msgspec.structs.replace(p, value=11)
    assert restored.lookup(other) == (Claim.CONFLICT, 7)
    assert DedupIndex().lookup(p) == (Claim.NEW, None)
