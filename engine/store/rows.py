"""Ledger rows to records, shared by both backends (their SQL selects the same columns)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..model import BatchRecord, OpenPayment, Outcome, Payment


def payment_from_row(r: Sequence[Any], shared: dict[Any, Any]) -> Payment:
    """(chain_id, network, x402_version, token, payer, payee, value, valid_after, valid_before,
    nonce, signature, method, permitted) → Payment.

    Addresses come as raw bytes (DuckDB ``unhex``) or ``0x`` text
    (PostgreSQL) and become bytes. Values that repeat across rows (network, addresses) are
    shared through ``shared``: a million recovered payments then hold a few hundred copies of
    them, not a million."""

    def address(value: Any) -> bytes:
        found: bytes | None = shared.get(value)
        if found is None:
            raw = bytes.fromhex(value[2:]) if isinstance(value, str) else bytes(value)
            found = shared[value] = shared.setdefault(raw, raw)
        return found

    return Payment(
        chain_id=int(r[0]),
        network=shared.setdefault(r[1], r[1]),
        x402_version=int(r[2]),
        token=address(r[3]),
        payer=address(r[4]),
        payee=address(r[5]),
        value=int(r[6]),
        valid_after=int(r[7]),
        valid_before=int(r[8]),
        nonce=bytes(r[9]),
        signature=bytes(r[10]),
        method=int(r[11]),
        permitted=int(r[12] or 0),
    )


def open_payment_from_row(r: Sequence[Any], shared: dict[Any, Any]) -> OpenPayment:
    """(id, accepted_at_ms, <payment_from_row's 13 columns>, state, batch_id)."""
    return OpenPayment(
        id=int(r[0]),
        accepted_at_ms=int(r[1]),
        payment=payment_from_row(r[2:15], shared),
        state=shared.setdefault(r[15], r[15]),
        batch_id=None if r[16] is None else int(r[16]),
    )


def batch_from_row(r: Sequence[Any]) -> BatchRecord:
    """(id, chain_id, mode, signer, account_nonce, gas_limit, max_fee_per_gas, tx_hash, raw_tx,
    payment_ids)."""
    return BatchRecord(
        id=int(r[0]),
        chain_id=int(r[1]),
        mode=str(r[2]),
        signer=str(r[3]),
        account_nonce=int(r[4]),
        gas_limit=int(r[5]),
        max_fee_per_gas=int(r[6]),
        tx_hash=str(r[7]),
        raw_tx=bytes(r[8]),
        payment_ids=[int(x) for x in r[9]],
    )


def outcome_from_row(row: Sequence[Any]) -> Outcome:
    """(id, state, chain_id, payer, payee, value, tx_hash, block_number, gas_used, reason,
    message)."""
    return Outcome(
        id=int(row[0]),
        state=str(row[1]),
        chain_id=int(row[2]),
        payer=str(row[3]),
        payee=str(row[4]),
        value=int(row[5]),
        tx_hash=row[6],
        block_number=row[7],
        gas_used=row[8],
        reason=row[9],
        message=row[10],
    )
