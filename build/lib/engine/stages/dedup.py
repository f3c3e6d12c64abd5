"""The dedup stage: an in-memory index of live replay keys (chain, token, payer, nonce).

Resubmitting the identical authorization returns the existing record id (idempotent); a
different authorization with a used key is rejected. A key can be forgotten once its validBefore
has passed: any payload carrying it is then refused as expired by ingest, and the token itself
refuses the nonce on chain.

Each entry also carries whether the payment was *sold*: a ``/settle`` answered ``success`` for
it (one payment, one purchase). The bit is set with no checkpoint between test and set, so of
many concurrent settles exactly one wins.

Memory matters here (one entry per live authorization, millions of them), so an entry is a
16-byte digest of the replay key mapping to one integer that packs the record id, the sold bit
and a 64-bit fingerprint of the exact signed authorization; expiry is kept in per-minute
buckets of keys rather than a heap of tuples. About 150 bytes per live entry in CPython (measured by
``x402-engine bench --scenario scale``). Digest collisions (2^-128) and fingerprint collisions
(2^-64) can only ever make the index refuse a payment or take it for a duplicate; they can never
let an authorization be settled twice, which the token prevents on chain anyway.
"""

from __future__ import annotations

from enum import Enum

from ..chain import crypto
from ..model import Payment

_FP_BITS = 64
_FP_MASK = (1 << _FP_BITS) - 1
_SOLD = 1 << _FP_BITS
_ID_SHIFT = _FP_BITS + 1
_BUCKET_S = 60


class Claim(Enum):
    NEW = "new"  # the key was free and is now reserved for the caller
    SAME = "same"  # the identical authorization is already on record
    CONFLICT = "conflict"  # another authorization already uses this key


def key_digest(payment: Payment) -> bytes:
    """16-byte digest of the replay key (chain, token, payer, nonce)."""
    return crypto.keccak256(payment.key)[:16]


def fingerprint(payment: Payment) -> int:
    """64-bit fingerprint of the exact authorization (every signed field and the signature).

    Python's own tuple hash (SipHash over the bytes, keyed per process) is enough because the
    index lives in one process and is rebuilt from the ledger at start; it costs a tenth of a
    keccak over the same fields."""
    p = payment
    return hash((p.signature, p.payee, p.value, p.valid_after, p.valid_before)) & _FP_MASK


class DedupIndex:
    """Live replay keys → record id, sold bit and fingerprint. Used only from the trio thread."""

    def __init__(self) -> None:
        self._entries: dict[bytes, int] = {}  # key digest -> record_id << 64 | fingerprint
        self._buckets: dict[int, list[bytes]] = {}  # validBefore minute -> key digests

    def __len__(self) -> int:
        return len(self._entries)

    def claim(self, payment: Payment, record_id: int) -> tuple[Claim, int]:
        """Reserve ``payment``'s key for ``record_id``; returns the claim and the owning id."""
        key = key_digest(payment)
        fp = fingerprint(payment)
        found = self._entries.get(key)
        if found is not None:
            owner = found >> _ID_SHIFT
            return (Claim.SAME if (found & _FP_MASK) == fp else Claim.CONFLICT), owner
        self._insert(key, record_id, fp, payment.valid_before)
        return Claim.NEW, record_id

    def peek(self, payment: Payment) -> Claim:
        """What :meth:`claim` would answer, without reserving anything."""
        return self.lookup(payment)[0]

    def lookup(self, payment: Payment) -> tuple[Claim, int | None]:
        """What :meth:`claim` would answer and the owning record id (None when NEW)."""
        found = self._entries.get(key_digest(payment))
        if found is None:
            return Claim.NEW, None
        same = (found & _FP_MASK) == fingerprint(payment)
        return (Claim.SAME if same else Claim.CONFLICT), found >> _ID_SHIFT

    def is_sold(self, payment: Payment) -> bool:
        found = self._entries.get(key_digest(payment))
        return found is not None and bool(found & _SOLD)

    def mark_sold(self, payment: Payment) -> bool:
        """Mark the recorded ``payment`` sold; True if this call did (False: it already was).
        No checkpoint between test and set: of concurrent callers, exactly one gets True."""
        key = key_digest(payment)
        found = self._entries.get(key)
        assert found is not None and (found & _FP_MASK) == fingerprint(payment), "not on record"
        if found & _SOLD:
            return False
        self._entries[key] = found | _SOLD
        return True

    def unmark_sold(self, payment: Payment) -> None:
        """Undo :meth:`mark_sold` whose durable record failed."""
        key = key_digest(payment)
        found = self._entries.get(key)
        if found is not None:
            self._entries[key] = found & ~_SOLD

    def release(self, payment: Payment, record_id: int) -> None:
        """Undo a claim whose durable write failed."""
        key = key_digest(payment)
        found = self._entries.get(key)
        if found is not None and found >> _ID_SHIFT == record_id:
            del self._entries[key]

    def restore(self, payment: Payment, record_id: int, *, sold: bool = False) -> None:
        """Load a recorded payment at start-up."""
        fp = fingerprint(payment) | (_SOLD if sold else 0)
        self._insert(key_digest(payment), record_id, fp, payment.valid_before)

    def evict_expired(self, now: float, grace_s: int) -> int:
        """Forget keys whose validBefore is more than ``grace_s`` (plus up to one bucket, a
        minute) in the past."""
        limit = int(now - grace_s) // _BUCKET_S  # buckets wholly before now - grace
        evicted = 0
        for minute in [m for m in self._buckets if m < limit]:
            for key in self._buckets.pop(minute):
                if self._entries.pop(key, None) is not None:
                    evicted += 1
        return evicted

    def _insert(self, key: bytes, record_id: int, fp: int, valid_before: int) -> None:
        assert record_id >= 0
        self._entries[key] = (record_id << _ID_SHIFT) | fp
        self._buckets.setdefault(valid_before // _BUCKET_S, []).append(key)


class Identifiers:
    """payment-identifier ids → the payment (its replay key) they were first sent with, and the
    ids sales were made with. Forgotten with the payment's replay key (after validBefore)."""

    def __init__(self) -> None:
        self._bound: dict[str, bytes] = {}  # id -> replay key of its payment
        self._sold_with: dict[int, tuple[str, str]] = {}  # record id -> (id, mode) of its sale
        self._buckets: dict[int, list[tuple[str, bytes]]] = {}  # validBefore minute -> binds

    def __len__(self) -> int:
        return len(self._bound)

    def bound(self, identifier: str) -> bytes | None:
        """The replay key ``identifier`` is bound to, if any."""
        return self._bound.get(identifier)

    def bind(self, identifier: str, key: bytes, valid_before: int) -> bool:
        """Bind ``identifier`` to the payment with replay key ``key``; False if it is bound
        already (to that payment or another)."""
        if identifier in self._bound:
            return False
        self._bound[identifier] = key
        self._buckets.setdefault(valid_before // _BUCKET_S, []).append((identifier, key))
        return True

    def unbind(self, identifier: str, key: bytes) -> None:
        """Undo :meth:`bind` for a payment that was not accepted after all."""
        if self._bound.get(identifier) == key:
            del self._bound[identifier]

    def sold_with(self, record_id: int) -> tuple[str, str] | None:
        """(identifier, mode) of the sale of ``record_id``, if it was made with an id."""
        return self._sold_with.get(record_id)

    def record_sale(self, record_id: int, identifier: str, mode: str) -> None:
        self._sold_with[record_id] = (identifier, mode)

    def forget_sale(self, record_id: int) -> None:
        self._sold_with.pop(record_id, None)

    def evict_expired(self, now: float, grace_s: int) -> int:
        limit = int(now - grace_s) // _BUCKET_S
        evicted = 0
        for minute in [m for m in self._buckets if m < limit]:
            for identifier, key in self._buckets.pop(minute):
                if self._bound.get(identifier) == key:
                    del self._bound[identifier]
                    evicted += 1
        if evicted:  # a sale made with an id goes with the id's binding
            self._sold_with = {r: v for r, v in self._sold_with.items() if v[0] in self._bound}
        return evicted
