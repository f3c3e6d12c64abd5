"""The ledger stage: an append-only DuckDB record of every payment, batch and state change.

An accepted payment is durable once its intake group is in the journal (``journal.py``, one
``fdatasync`` per group); the ledger stages journaled payments and writes them to DuckDB in bulk
(Arrow tables, one INSERT ... SELECT and one commit per flush; per-row INSERTs manage under 1,000
rows/s). Every other ledger call flushes the staged payments first, so DuckDB never shows an
event of a payment it does not hold. Opening a ledger replays the journal into DuckDB.

State changes are appended to ``payment_events`` / ``batch_events`` and never updated in place:
a payment's current state is its latest event (highest ``seq``); no event means "accepted".

All DuckDB work runs in a worker thread (DuckDB releases the GIL) behind a one-slot limiter, so
the connection is never used by two threads at once and the trio thread never blocks on disk.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import duckdb
import pyarrow as pa
import trio

from ..model import (
    BatchEvent,
    BatchRecord,
    Clash,
    OpenPayment,
    Outcome,
    Payment,
    PaymentEvent,
    Recovered,
    Sale,
    hex_addr,
)
from .backend import LedgerBackend
from .journal import Journal, JournalRow, SalvageReport, encode_frame
from .rows import batch_from_row, open_payment_from_row, outcome_from_row, payment_from_row

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS payments (
    id BIGINT NOT NULL,
    accepted_at_ms BIGINT NOT NULL,
    chain_id BIGINT NOT NULL,
    network VARCHAR NOT NULL,
    x402_version UTINYINT NOT NULL,
    token VARCHAR NOT NULL,
    payer VARCHAR NOT NULL,
    payee VARCHAR NOT NULL,
    value UHUGEINT NOT NULL,
    valid_after UBIGINT NOT NULL,
    valid_before UBIGINT NOT NULL,
    nonce BLOB NOT NULL,
    signature BLOB NOT NULL,
    method UTINYINT NOT NULL DEFAULT 0,
    permitted UHUGEINT
);
-- Ledgers written before Permit2 payments existed gain the columns (EIP-3009: method 0).
ALTER TABLE payments ADD COLUMN IF NOT EXISTS method UTINYINT DEFAULT 0;
ALTER TABLE payments ADD COLUMN IF NOT EXISTS permitted UHUGEINT;
CREATE TABLE IF NOT EXISTS payment_events (
    seq BIGINT NOT NULL,
    payment_id BIGINT NOT NULL,
    at_ms BIGINT NOT NULL,
    state VARCHAR NOT NULL,
    batch_id BIGINT,
    tx_hash VARCHAR,
    block_number BIGINT,
    gas_used BIGINT,
    fee_wei UHUGEINT,
    reason VARCHAR,
    message VARCHAR
);
CREATE TABLE IF NOT EXISTS batches (
    id BIGINT NOT NULL,
    chain_id BIGINT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    mode VARCHAR NOT NULL,
    signer VARCHAR NOT NULL,
    account_nonce BIGINT NOT NULL,
    item_count INTEGER NOT NULL,
    gas_limit BIGINT NOT NULL,
    max_fee_per_gas UHUGEINT NOT NULL,
    tx_hash VARCHAR NOT NULL,
    raw_tx BLOB NOT NULL,
    payment_ids BIGINT[] NOT NULL
);
CREATE TABLE IF NOT EXISTS sales (
    payment_id BIGINT NOT NULL,
    at_ms BIGINT NOT NULL,
    mode VARCHAR NOT NULL,
    identifier VARCHAR
);
CREATE TABLE IF NOT EXISTS batch_transactions (
    batch_id BIGINT NOT NULL,
    at_ms BIGINT NOT NULL,
    tx_hash VARCHAR NOT NULL,
    raw_tx BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS id_reservations (
    ceiling BIGINT NOT NULL,
    at_ms BIGINT NOT NULL
);
-- What chain this ledger settles on, bound at its first start on each chain (see
-- engine.recovery.bind_ledger): per chain id, subject 'genesis' holds the genesis block hash,
-- and each batcher address (lowercase 0x hex) the keccak256 of its deployed code. Ledgers
-- written before the binding existed gain the empty table and are bound at their next start.
CREATE TABLE IF NOT EXISTS chain_bindings (
    chain_id BIGINT NOT NULL,
    subject VARCHAR NOT NULL,
    hash VARCHAR NOT NULL,
    bound_at_ms BIGINT NOT NULL,
    PRIMARY KEY (chain_id, subject)
);
CREATE TABLE IF NOT EXISTS batch_events (
    seq BIGINT NOT NULL,
    batch_id BIGINT NOT NULL,
    at_ms BIGINT NOT NULL,
    state VARCHAR NOT NULL,
    tx_hash VARCHAR,
    block_number BIGINT,
    gas_used BIGINT,
    effective_gas_price UHUGEINT,
    message VARCHAR
);
"""

_PAYMENT_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("accepted_at_ms", pa.int64()),
        ("chain_id", pa.int64()),
        ("network", pa.string()),
        ("x402_version", pa.uint8()),
        ("token", pa.string()),
        ("payer", pa.string()),
        ("payee", pa.string()),
        ("value", pa.string()),
        ("valid_after", pa.uint64()),
        ("valid_before", pa.uint64()),
        ("nonce", pa.binary()),
        ("signature", pa.binary()),
        ("method", pa.uint8()),
        ("permitted", pa.string()),
    ]
)

_EVENT_SCHEMA = pa.schema(
    [
        ("seq", pa.int64()),
        ("payment_id", pa.int64()),
        ("at_ms", pa.int64()),
        ("state", pa.string()),
        ("batch_id", pa.int64()),
        ("tx_hash", pa.string()),
        ("block_number", pa.int64()),
        ("gas_used", pa.int64()),
        ("fee_wei", pa.string()),
        ("reason", pa.string()),
        ("message", pa.string()),
    ]
)


class LedgerBusy(RuntimeError):
    """Another process holds the ledger file."""


class Ledger:
    """Synchronous DuckDB access (one process: the embedded backend). Use through
    :class:`AsyncLedger` from trio code.

    ``journal``: keep a write-ahead journal beside the file (``<path>.journal/``) so accepted
    payments are durable without a DuckDB commit each (ignored for ``:memory:``)."""

    concurrency = 1  # one DuckDB connection: calls run one at a time
    dialect: Literal["duckdb"] = "duckdb"
    instance_id = 0  # one process: no instances

    def __init__(
        self,
        path: str | Path,
        *,
        journal: bool = True,
        journal_segment_bytes_max: int = 64 << 20,
        salvage: bool = False,
    ) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self._con = duckdb.connect(self.path)
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower():
                raise
            raise LedgerBusy(
                f"the ledger {self.path} is in use by another process (DuckDB allows one writer"
                " per file): stop it first, e.g. x402-engine serve"
            ) from None
        self._con.execute(SCHEMA)
        row = self._con.execute(
            "SELECT coalesce(max(seq), 0) FROM ("
            "SELECT seq FROM payment_events UNION ALL SELECT seq FROM batch_events)"
        ).fetchone()
        assert row is not None
        self._seq = int(row[0])
        self._next_free: int | None = None  # next payment id to reserve from
        self._owner: int | None = None
        self._staged: list[JournalRow] = []
        self._staged_lock = threading.Lock()
        self.replayed = 0
        self.salvaged: SalvageReport | None = None
        self.journal: Journal | None = None
        if journal and self.path != ":memory:":
            self.journal = Journal(Path(self.path + ".journal"), journal_segment_bytes_max)
            if salvage:  # the operator's recovery: every intact frame, damage set aside
                rows, self.salvaged = self.journal.salvage()
            else:
                rows = self.journal.replay()
            self.replayed = self._insert_missing(rows)
            self.journal.reset()  # DuckDB holds every replayed row now

    def close(self) -> None:
        self.flush_staged()
        if self.journal is not None:
            self.journal.reset()  # everything is in DuckDB
            self.journal.close()
        self._con.close()

    # -- writes -----------------------------------------------------------------------------

    def stage(self, rows: Sequence[JournalRow]) -> int:
        """Take journaled payments for the next flush (any thread); returns how many wait."""
        with self._staged_lock:
            self._staged.extend(rows)
            return len(self._staged)

    def staged_count(self) -> int:
        return len(self._staged)

    def flush_staged(self) -> int:
        """Write every staged payment to DuckDB in one commit, then let the journal drop the
        segments DuckDB now covers; returns how many were written."""
        with self._staged_lock:
            rows, self._staged = self._staged, []
        if not rows:
            return 0
        try:
            self.insert_payments(rows)
        except BaseException:
            with self._staged_lock:  # still in the journal; keep them for the next try
                self._staged[:0] = rows
            raise
        if self.journal is not None:
            self.journal.release_through(max(r[0] for r in rows))
        return len(rows)

    def insert_payments(
        self, rows: Sequence[JournalRow], credit: Mapping[int, int] | None = None
    ) -> dict[int, Clash]:
        """Record accepted payments ``(id, payment, accepted_at_ms)`` in DuckDB in one commit
        (bypasses the journal: the engine goes through :meth:`AsyncLedger.record_accepted`).
        Returns no clashes: one process owns this ledger, its dedup index and credit book are
        the whole truth (``credit`` is for the shared backend)."""
        if not rows:
            return {}
        table = pa.Table.from_pydict(
            {
                "id": [r[0] for r in rows],
                "accepted_at_ms": [r[2] for r in rows],
                "chain_id": [r[1].chain_id for r in rows],
                "network": [r[1].network for r in rows],
                "x402_version": [r[1].x402_version for r in rows],
                "token": [hex_addr(r[1].token) for r in rows],
                "payer": [hex_addr(r[1].payer) for r in rows],
                "payee": [hex_addr(r[1].payee) for r in rows],
                "value": [str(r[1].value) for r in rows],
                "valid_after": [r[1].valid_after for r in rows],
                "valid_before": [r[1].valid_before for r in rows],
                "nonce": [r[1].nonce for r in rows],
                "signature": [r[1].signature for r in rows],
                "method": [r[1].method for r in rows],
                "permitted": [str(r[1].permitted) if r[1].method else None for r in rows],
            },
            schema=_PAYMENT_SCHEMA,
        )
        self._in_transaction(
            lambda: self._insert_arrow("payments", table, value_cols=("value", "permitted"))
        )
        return {}

    def append_events(self, events: Sequence[PaymentEvent], at_ms: int) -> None:
        self.flush_staged()
        if events:
            self._in_transaction(lambda: self._write_events(events, at_ms))

    def record_batch_sent(
        self,
        batch: BatchRecord,
        events: Sequence[PaymentEvent],
        at_ms: int,
        lease_epoch: int | None = None,  # no leases: one process holds every signer
    ) -> None:
        """Write-ahead: the signed transaction and its items' ``submitted`` events, atomically."""
        self.flush_staged()

        def work() -> None:
            self._con.execute(
                "INSERT INTO batches VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?::UHUGEINT, ?, ?, ?)",
                [
                    batch.id,
                    batch.chain_id,
                    at_ms,
                    batch.mode,
                    batch.signer,
                    batch.account_nonce,
                    len(batch.payment_ids),
                    batch.gas_limit,
                    str(batch.max_fee_per_gas),
                    batch.tx_hash,
                    batch.raw_tx,
                    batch.payment_ids,
                ],
            )
            self._write_batch_event(BatchEvent(batch.id, "sent", tx_hash=batch.tx_hash), at_ms)
            self._write_events(events, at_ms)

        self._in_transaction(work)

    def record_batch_final(
        self, event: BatchEvent, events: Sequence[PaymentEvent], at_ms: int
    ) -> None:
        """The batch's fate and every item's outcome, atomically."""
        self.flush_staged()

        def work() -> None:
            self._write_batch_event(event, at_ms)
            self._write_events(events, at_ms)

        self._in_transaction(work)

    def reserve_ids(self, upto: int, at_ms: int = 0) -> int:
        """Make ``upto`` the highest payment id ever handed out, durably, before any id up to
        it is: however many journaled payments a damaged journal loses, the next start
        allocates above every id that could have been acknowledged. Returns the ceiling."""

        def work() -> None:
            self._con.execute("INSERT INTO id_reservations VALUES (?, ?)", [upto, at_ms])

        if upto > self._id_ceiling():
            self._in_transaction(work)
        return self._id_ceiling()

    def reserve_payment_ids(self, count: int, at_ms: int = 0) -> tuple[int, int]:
        """The next ``count`` payment ids, reserved durably (:meth:`reserve_ids`)."""
        if self._next_free is None:
            row = self._con.execute("SELECT coalesce(max(id), 0) FROM payments").fetchone()
            assert row is not None
            self._next_free = max(int(row[0]), self._id_ceiling()) + 1
        first = self._next_free
        last = self.reserve_ids(first + count - 1, at_ms)
        self._next_free = last + 1
        return first, last

    def _id_ceiling(self) -> int:
        row = self._con.execute("SELECT coalesce(max(ceiling), 0) FROM id_reservations").fetchone()
        assert row is not None
        return int(row[0])

    def record_replacement(self, batch_id: int, tx_hash: str, raw_tx: bytes, at_ms: int) -> None:
        """Write-ahead: a replacement of a sent batch (same account nonce, higher fees), before
        it is broadcast; every hash a batch was sent under stays watched."""
        self.flush_staged()

        def work() -> None:
            self._con.execute(
                "INSERT INTO batch_transactions VALUES (?, ?, ?, ?)",
                [batch_id, at_ms, tx_hash, raw_tx],
            )

        self._in_transaction(work)

    def record_sales(self, sales: Sequence[Sale], at_ms: int) -> set[int]:
        """Payments a /settle answered ``success`` for (one payment, one purchase), atomically.
        Append-only: a payment appears here at most once (the dedup index's sold mark decides;
        one process owns the ledger, so no sale is ever another's: returns none)."""
        self.flush_staged()
        if not sales:
            return set()

        def work() -> None:
            self._con.executemany(
                "INSERT INTO sales VALUES (?, ?, ?, ?)",
                [[s.payment_id, at_ms, s.mode, s.identifier] for s in sales],
            )

        self._in_transaction(work)
        return set()

    def bind_chain(self, chain_id: int, binding: Mapping[str, str], at_ms: int) -> dict[str, str]:
        """Record the subjects of ``binding`` (subject -> hash) the chain has no binding for
        yet, in one committed transaction (durable before the engine goes on, like id
        reservations); a subject already bound keeps its hash. Returns the chain's binding."""
        bound = self.chain_binding(chain_id)
        rows = [[chain_id, k, v, at_ms] for k, v in binding.items() if k not in bound]

        def work() -> None:
            self._con.executemany("INSERT INTO chain_bindings VALUES (?, ?, ?, ?)", rows)

        if rows:
            self._in_transaction(work)
        return self.chain_binding(chain_id)

    # -- reads ------------------------------------------------------------------------------

    def chain_binding(self, chain_id: int) -> dict[str, str]:
        """The chain's binding: subject ('genesis', or a batcher address) -> hash."""
        rows = self._con.execute(
            "SELECT subject, hash FROM chain_bindings WHERE chain_id = ?", [chain_id]
        ).fetchall()
        return {str(r[0]): str(r[1]) for r in rows}

    def live_sales(self, valid_before_min: int, owners: Sequence[int] | None = None) -> list[Sale]:
        """Sales of payments whose authorization is still valid (their replays must be
        refused, and payment-identifier retries answered)."""
        self.flush_staged()
        rows = self._con.execute(
            "SELECT s.payment_id, s.mode, s.identifier FROM sales s"
            " JOIN payments p ON p.id = s.payment_id WHERE p.valid_before >= ?"
            " ORDER BY s.payment_id",
            [valid_before_min],
        ).fetchall()
        return [Sale(int(r[0]), str(r[1]), r[2]) for r in rows]

    def bind_identifier(self, identifier: str, key: bytes, valid_before: int) -> bytes:
        """One process: the engine's in-memory binding is the whole truth."""
        return key

    def sale(self, payment_id: int) -> Sale | None:
        self.flush_staged()
        row = self._con.execute(
            "SELECT payment_id, mode, identifier FROM sales WHERE payment_id = ?", [payment_id]
        ).fetchone()
        return None if row is None else Sale(int(row[0]), str(row[1]), row[2])

    def recover(self, owners: Sequence[int] | None = None) -> Recovered:
        """Everything not yet final: payments to queue again, batches to reconcile.
        (``owners``: for the shared backend; here everything is this process's.)"""
        self.flush_staged()
        open_batches = self._open_batches()
        ids = self._con.execute(
            "SELECT coalesce((SELECT max(id) FROM payments), 0),"
            " coalesce((SELECT max(id) FROM batches), 0)"
        ).fetchone()
        assert ids is not None
        next_payment_id = max(int(ids[0]), self._id_ceiling()) + 1  # ids never repeat
        self._next_free = next_payment_id
        return Recovered(
            self._open_payments(),
            open_batches,
            next_payment_id,
            int(ids[1]) + 1,
            self._transactions_of(open_batches),
        )

    def _open_payments(self) -> list[OpenPayment]:
        rows = self._con.execute(
            """
            WITH last AS (
                SELECT payment_id, state, batch_id FROM payment_events
                QUALIFY row_number() OVER (PARTITION BY payment_id ORDER BY seq DESC) = 1
            )
            SELECT p.id, p.accepted_at_ms, p.chain_id, p.network, p.x402_version,
                   unhex(p.token[3:]), unhex(p.payer[3:]), unhex(p.payee[3:]), p.value::VARCHAR,
                   p.valid_after, p.valid_before, p.nonce, p.signature,
                   coalesce(p.method, 0), p.permitted::VARCHAR,
                   coalesce(last.state, 'accepted'), last.batch_id
            FROM payments p LEFT JOIN last ON p.id = last.payment_id
            WHERE last.state IS NULL OR last.state NOT IN ('settled', 'failed')
            ORDER BY p.id
            """
        ).fetchall()
        shared: dict[Any, Any] = {}
        return [open_payment_from_row(r, shared) for r in rows]

    def _open_batches(self) -> list[BatchRecord]:
        batch_rows = self._con.execute(
            """
            WITH last AS (
                SELECT batch_id, state FROM batch_events
                QUALIFY row_number() OVER (PARTITION BY batch_id ORDER BY seq DESC) = 1
            )
            SELECT b.id, b.chain_id, b.mode, b.signer, b.account_nonce, b.gas_limit,
                   b.max_fee_per_gas::VARCHAR, b.tx_hash, b.raw_tx, b.payment_ids
            FROM batches b JOIN last ON b.id = last.batch_id
            WHERE last.state = 'sent'
            ORDER BY b.id
            """
        ).fetchall()
        return [batch_from_row(r) for r in batch_rows]

    def _transactions_of(self, batches: list[BatchRecord]) -> dict[int, list[tuple[str, bytes]]]:
        """Every transaction signed for these batches (the first and its fee-bump replacements),
        oldest first: any of them may be the one that gets mined."""
        out: dict[int, list[tuple[str, bytes]]] = {}
        if batches:
            for batch_id, tx_hash, raw in self._con.execute(
                "SELECT batch_id, tx_hash, raw_tx FROM batch_transactions"
                " WHERE batch_id >= ? ORDER BY batch_id, at_ms, tx_hash",
                [min(b.id for b in batches)],
            ).fetchall():
                out.setdefault(int(batch_id), []).append((str(tx_hash), bytes(raw)))
        return out

    def live_final_payments(
        self, valid_before_min: int, owners: Sequence[int] | None = None
    ) -> list[tuple[int, Payment]]:
        """Final (settled or failed) payments whose authorization is still valid: their replay
        keys must stay known. (Open ones come from :meth:`recover`.)"""
        self.flush_staged()
        rows = self._con.execute(
            "SELECT id, chain_id, network, x402_version, unhex(token[3:]), unhex(payer[3:]),"
            " unhex(payee[3:]), value::VARCHAR, valid_after, valid_before, nonce, signature,"
            " coalesce(method, 0), permitted::VARCHAR FROM payments WHERE valid_before >= ?"
            " AND id IN (SELECT payment_id FROM payment_events"
            " WHERE state IN ('settled', 'failed')) ORDER BY id",
            [valid_before_min],
        ).fetchall()
        shared: dict[Any, Any] = {}
        return [(int(r[0]), payment_from_row(r[1:14], shared)) for r in rows]

    def outcome(self, payment_id: int) -> Outcome | None:
        self.flush_staged()
        row = self._con.execute(
            """
            SELECT p.id, coalesce(e.state, 'accepted'), p.chain_id, p.payer, p.payee,
                   p.value::VARCHAR, e.tx_hash, e.block_number, e.gas_used, e.reason, e.message
            FROM payments p LEFT JOIN (
                SELECT * FROM payment_events WHERE payment_id = $id
                ORDER BY seq DESC LIMIT 1
            ) e ON e.payment_id = p.id
            WHERE p.id = $id
            """,
            {"id": payment_id},
        ).fetchone()
        if row is None:
            return None
        return outcome_from_row(row)

    def history(self, payment_id: int) -> list[dict[str, Any]]:
        """Every recorded event of one payment, oldest first."""
        self.flush_staged()
        cur = self._con.execute(
            "SELECT at_ms, state, batch_id, tx_hash, block_number, gas_used,"
            " fee_wei::VARCHAR AS fee_wei, reason, message"
            " FROM payment_events WHERE payment_id = ? ORDER BY seq",
            [payment_id],
        )
        names = [d[0] for d in cur.description or []]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]

    def query(self, sql: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        """Read-only SQL for reports and tests."""
        return self.query_with_columns(sql, params)[1]

    def query_with_columns(
        self, sql: str, params: Sequence[Any] | None = None
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Read-only SQL with the result's column names: run in a transaction that is rolled
        back, so an ad hoc statement cannot change the ledger."""
        self.flush_staged()
        self._con.begin()
        try:
            cur = self._con.execute(sql, params or [])
            return [d[0] for d in cur.description or []], cur.fetchall()
        finally:
            self._con.rollback()

    # -- internals --------------------------------------------------------------------------

    def _insert_missing(self, rows: list[JournalRow]) -> int:
        """Journal rows DuckDB does not hold yet (a crash came before their flush)."""
        if not rows:
            return 0
        low = min(r[0] for r in rows)
        have = {
            int(r[0])
            for r in self._con.execute("SELECT id FROM payments WHERE id >= ?", [low]).fetchall()
        }
        missing = [r for r in rows if r[0] not in have]
        self.insert_payments(missing)
        return len(missing)

    def _in_transaction(self, work: Callable[[], None]) -> None:
        me = threading.get_ident()
        assert self._owner is None, "ledger used from two threads at once"
        self._owner = me
        try:
            self._con.begin()
            try:
                work()
            except BaseException:
                self._con.rollback()
                raise
            self._con.commit()
        finally:
            self._owner = None

    def _insert_arrow(self, table_name: str, table: pa.Table, value_cols: tuple[str, ...]) -> None:
        cols = [f'"{c}"::UHUGEINT' if c in value_cols else f'"{c}"' for c in table.column_names]
        self._con.register("_incoming", table)
        try:
            self._con.execute(f"INSERT INTO {table_name} SELECT {', '.join(cols)} FROM _incoming")
        finally:
            self._con.unregister("_incoming")

    def _write_events(self, events: Sequence[PaymentEvent], at_ms: int) -> None:
        if not events:
            return
        first = self._seq + 1
        self._seq += len(events)
        table = pa.Table.from_pydict(
            {
                "seq": list(range(first, first + len(events))),
                "payment_id": [e.payment_id for e in events],
                "at_ms": [at_ms] * len(events),
                "state": [e.state for e in events],
                "batch_id": [e.batch_id for e in events],
                "tx_hash": [e.tx_hash for e in events],
                "block_number": [e.block_number for e in events],
                "gas_used": [e.gas_used for e in events],
                "fee_wei": [None if e.fee_wei is None else str(e.fee_wei) for e in events],
                "reason": [e.reason for e in events],
                "message": [e.message for e in events],
            },
            schema=_EVENT_SCHEMA,
        )
        self._insert_arrow("payment_events", table, value_cols=("fee_wei",))

    def _write_batch_event(self, event: BatchEvent, at_ms: int) -> None:
        self._seq += 1
        self._con.execute(
            "INSERT INTO batch_events VALUES (?, ?, ?, ?, ?, ?, ?, ?::UHUGEINT, ?)",
            [
                self._seq,
                event.batch_id,
                at_ms,
                event.state,
                event.tx_hash,
                event.block_number,
                event.gas_used,
                None if event.effective_gas_price is None else str(event.effective_gas_price),
                event.message,
            ],
        )


class AsyncLedger:
    """Runs :class:`Ledger` calls in a worker thread, one at a time; journal appends run on a
    thread of their own so that an acknowledgement never waits behind a DuckDB commit."""

    def __init__(
        self, ledger: LedgerBackend, flush_rows: int = 20_000, *, threads: bool = True
    ) -> None:
        assert flush_rows >= 1
        self.sync = ledger
        self.flush_rows = flush_rows
        # threads=False runs every call inline on the trio thread: slower, but with no thread
        # timing in the schedule (the seeded simulator's deterministic replays).
        self.threads = threads
        self._limiter = trio.CapacityLimiter(ledger.concurrency)
        self._journal_limiter = trio.CapacityLimiter(1)
        self._beside_limiter = trio.CapacityLimiter(1)
        self._flush_wanted = trio.Event()

    async def record_accepted(
        self, rows: Sequence[JournalRow], credit: Mapping[int, int] | None = None
    ) -> dict[int, Clash]:
        """Make accepted payments durable: journal append + fdatasync (or, with no journal, a
        database commit). Returns once they would survive a crash, with the rows the shared
        backend did not record as ours (another instance's replay key, or over the payer's
        cluster-wide credit ``credit[row id]``)."""
        journal = self.sync.journal
        if journal is None:
            return await self.run(self.sync.insert_payments, rows, credit)
        frame = encode_frame(rows)
        max_id = max(r[0] for r in rows)
        if self.threads:
            await trio.to_thread.run_sync(
                journal.append, frame, max_id, limiter=self._journal_limiter
            )
        else:
            journal.append(frame, max_id)
            await trio.lowlevel.checkpoint()
        if self.sync.stage(rows) >= self.flush_rows:
            self._flush_wanted.set()
        return {}

    async def run_flusher(self, interval_s: float) -> None:
        """Move staged payments into DuckDB every ``interval_s`` or ``flush_rows``, whichever
        comes first. A DuckDB failure propagates (the payments stay in the journal)."""
        assert interval_s > 0
        while True:
            with trio.move_on_after(interval_s):
                await self._flush_wanted.wait()
            self._flush_wanted = trio.Event()
            if self.sync.staged_count():
                await self.run(self.sync.flush_staged)

    async def run_beside(self, fn: Callable[..., T], *args: Any) -> T:
        """Like :meth:`run`, on a thread of its own: work that must not queue behind the
        intake's writes (a shared ledger's heartbeats, which keep the instance alive)."""
        if not self.threads:
            return await self.run(fn, *args)
        return await trio.to_thread.run_sync(fn, *args, limiter=self._beside_limiter)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        if not self.threads:
            result = fn(*args)
            await trio.lowlevel.checkpoint()
            return result
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
