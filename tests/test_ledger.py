"""The DuckDB ledger: grouped writes, append-only history, recovery queries, durability."""

from __future__ import annotations

import os
from pathlib import Path

from engine.model import BatchEvent, BatchRecord, Payment, PaymentEvent
from engine.store.ledger import Ledger


def _payment(value: int = 10) -> Payment:
    return Payment(
        chain_id=8453,
        token=os.urandom(20),
        payer=os.urandom(20),
        payee=os.urandom(20),
        value=value,
        valid_after=1,
        valid_before=2_000_000_000,
        nonce=os.urandom(32),
        signature=os.urandom(65),
        network="eip155:8453",
        x402_version=2,
    )


def test_payments_round_trip_through_a_reopened_file(tmp_path: Path) -> None:
    path = tmp_path / "ledger.duckdb"
    big = _payment(value=2**128 - 1)
    rows = [(i, _payment(), 1000 + i) for i in range(1, 2001)] + [(2001, big, 5)]
    ledger = Ledger(path)
    ledger.insert_payments(rows)
    ledger.close()
    reopened = Ledger(path)
    recovered = reopened.recover()
    assert len(recovered.open_payments) == 2001
    assert recovered.open_payments[-1].payment == big
    assert recovered.open_payments[0].payment == rows[0][1]
    assert recovered.next_payment_id == 2002
    reopened.close()


def test_history_is_append_only_and_latest_event_wins(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.duckdb")
    p = _payment()
    ledger.insert_payments([(1, p, 0), (2, _payment(), 0)])
    batch = BatchRecord(7, 8453, "compact", "0xab", 3, 100_000, 10**9, "0xhash", b"raw", [1, 2])
    ledger.record_batch_sent(batch, [PaymentEvent(1, "submitted", batch_id=7)], 10)
    recovered = ledger.recover()
    assert [b.id for b in recovered.open_batches] == [7]
    assert {(o.id, o.state) for o in recovered.open_payments} == {(1, "submitted"), (2, "accepted")}
    ledger.record_batch_final(
        BatchEvent(7, "mined", "0xhash", 5, 90_000, 10**9),
        [PaymentEvent(1, "settled", batch_id=7, tx_hash="0xhash", gas_used=45_000)],
        20,
    )
    after = ledger.recover()
    assert after.open_batches == [] and [o.id for o in after.open_payments] == [2]
    assert [h["state"] for h in ledger.history(1)] == ["submitted", "settled"]
    outcome = ledger.outcome(1)
    assert outcome is not None and outcome.state == "settled" and outcome.gas_used == 45_000
    assert ledger.outcome(3) is None
    (count,) = ledger.query("SELECT count(*) FROM payment_events")[0]
    assert count == 2


def test_failed_transaction_leaves_nothing_behind(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.duckdb")
    bad = _payment()
    try:
        ledger.insert_payments([(1, _payment(), 0), (2, bad, 0), (3, bad, "not-a-number")])  # type: ignore[list-item]
    except Exception:
        pass
    else:  # pragma: no cover - the bad row must make the group fail
        raise AssertionError("expected the write to fail")
    assert ledger.query("SELECT count(*) FROM payments") == [(0,)]


def test_a_ledger_held_by_another_process_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = tmp_path / "l.duckdb"
    holder = Ledger(path)  # as a running `serve` would
    try:
        done = subprocess.run(
            [sys.executable, "-m", "engine.cli", "report", "--ledger", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        holder.close()
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1, done.stderr
    assert len(lines) == 1 and "in use by another process" in lines[0], done.stderr
    assert "Traceback" not in done.stderr
