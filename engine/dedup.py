"""The dedup stage: an in-memory index of live replay keys (chain, token, payer, nonce).

A key maps to the record id that owns it and the 32-byte fingerprint of the exact signed
authorization. Resubmitting the identical authorization returns the existing id (idempotent);
a different authorization with a used key is rejected. A key can be forgotten once its
validBefore has passed: any payload carrying it is then refused as expired by ingest, and the
token itself refuses the nonce on chain.
"""

from __future__ import annotations

import heapq
from enum import Enum

from . import crypto
from .model import Payment


class Claim(Enum):
    NEW = "new"  # the key was free and is now reserved for the caller
    SAME = "same"  # the identical authorization is already on record
    CONFLICT = "conflict"  # another authorization already uses this key


def fingerprint(payment: Payment) -> bytes:
    """Identifies the exact authorization (all signed fields and the signature)."""
    return crypto.keccak256(
        payment.key
        + payment.payee
        + payment.value.to_bytes(32, "big")
        + payment.valid_after.to_bytes(8, "big")
        + payment.valid_before.to_bytes(8, "big")
        + payment.signature
    )[:16]


class DedupIndex:
    """Live replay keys → (record id, fingerprint). Not thread-safe: used from the trio thread."""

    def __init__(self) -> None:
        self._entries: dict[bytes, tuple[int, bytes]] = {}
        self._expiry: list[tuple[int, bytes]] = []  # (valid_before, key) min-heap

    def __len__(self) -> int:
        return len(self._entries)

    def claim(self, payment: Payment, record_id: int) -> tuple[Claim, int]:
        """Reserve ``payment.key`` for ``record_id``; returns the claim and the owning id."""
        key = payment.key
        fp = fingerprint(payment)
        found = self._entries.get(key)
        if found is not None:
            owner, owner_fp = found
            return (Claim.SAME if owner_fp == fp else Claim.CONFLICT), owner
        self._entries[key] = (record_id, fp)
        heapq.heappush(self._expiry, (payment.valid_before, key))
        return Claim.NEW, record_id

    def peek(self, payment: Payment) -> Claim:
        """What :meth:`claim` would answer, without reserving anything."""
        found = self._entries.get(payment.key)
        if found is None:
            return Claim.NEW
        return Claim.SAME if found[1] == fingerprint(payment) else Claim.CONFLICT

    def release(self, payment: Payment, record_id: int) -> None:
        """Undo a claim whose durable write failed."""
        found = self._entries.get(payment.key)
        if found is not None and found[0] == record_id:
            del self._entries[payment.key]

    def restore(self, payment: Payment, record_id: int) -> None:
        """Load a recorded payment at start-up."""
        self._entries[payment.key] = (record_id, fingerprint(payment))
        heapq.heappush(self._expiry, (payment.valid_before, payment.key))

    def evict_expired(self, now: float, grace_s: int) -> int:
        """Forget keys whose validBefore is more than ``grace_s`` in the past."""
        evicted = 0
        while self._expiry and self._expiry[0][0] + grace_s < now:
            _, key = heapq.heappop(self._expiry)
            if self._entries.pop(key, None) is not None:
                evicted += 1
        return evicted
