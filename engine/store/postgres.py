"""The PostgreSQL ledger: the shared store of many engine instances.

Same records and guarantees as the DuckDB ledger (``ledger.py``), for a database every instance
reaches:

- **Acknowledged means committed.** An intake group is one multi-row ``INSERT`` and one commit
  (``synchronous_commit`` on, checked at start), so group commit still amortises the round trip.
  No journal: the database is the durable copy, and a lost machine loses nothing acknowledged.
- **Dedup across instances.** The unique key on (chain, token, payer, nonce) is the truth; each
  instance's in-memory index stays the fast path. ``INSERT ... ON CONFLICT DO NOTHING`` tells
  which rows another instance recorded first: the identical payment is answered with that
  record's id, a different one with the same key is refused.
- **One sale per payment** across instances: ``sales`` is keyed by payment id.
- **Instances and fencing.** Each engine registers an ``instances`` row and heartbeats it.
  Every write transaction first takes a share lock on the writer's own row and checks nobody
  has taken it over (``successor IS NULL``); a survivor's takeover updates that row, so it waits
  for writes in flight and every later write of the superseded instance fails
  (:class:`Superseded`). A paused instance that wakes up can neither acknowledge nor record a
  batch, and records come before broadcasts: it cannot send with an account another instance
  now holds. Signer accounts are leased per instance with an epoch (``signer_leases``), the
  fencing token a batch record is checked against.
- **Ids from blocks.** Payment and batch ids come from counters in blocks, so instances never
  collide and ids never repeat.

Times that decide liveness (heartbeats, lease expiry) are the database's ``now()``: instances'
clocks need not agree. Every call runs in a trio worker thread (psycopg's sync API) on a
connection from a ``psycopg_pool`` pool.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal, TypeVar

import msgspec
import psycopg
import psycopg_pool

from ..model import (
    PERMIT2,
    BatchEvent,
    BatchRecord,
    Clash,
    Outcome,
    Payment,
    PaymentEvent,
    Recovered,
    Sale,
    hex_addr,
)
from . import pg_schema
from .journal import Journal, JournalRow, SalvageReport
from .rows import batch_from_row, open_payment_from_row, outcome_from_row, payment_from_row

log = logging.getLogger("x402_engine.postgres")
T = TypeVar("T")

# A failed background write (events, batch records) is retried for this long while the
# database is away (a restart, a failover); acknowledgements are never retried: the caller
# is told, and the payer retries.
RETRY_FOR_S = 120.0


class SchemaMismatch(RuntimeError):
    """The database's schema version is not the one this engine runs."""


class Superseded(RuntimeError):
    """Another instance has taken this instance's work over: it must stop writing."""


class LeaseLost(RuntimeError):
    """A signer account's lease is no longer this instance's (or has a newer epoch)."""


def schema_version(con: psycopg.Connection[Any]) -> int:
    exists = con.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return 0
    row = con.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()
    return int(row[0]) if row else 0


def migrate(dsn: str) -> list[int]:
    """Apply every migration the database lacks, each in its own transaction; returns the
    versions applied (none: already current). Safe to run from several hosts at once: an
    advisory lock serialises them."""
    applied: list[int] = []
    with psycopg.connect(dsn, autocommit=True) as con:
        con.execute("SELECT pg_advisory_lock(402402)")
        try:
            con.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY,"
                " name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            current = schema_version(con)
            for version, name, sql in pg_schema.MIGRATIONS:
                if version <= current:
                    continue
                with con.transaction():
                    con.execute(sql.encode())
                    con.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                        [version, name],
                    )
                applied.append(version)
        finally:
            con.execute("SELECT pg_advisory_unlock(402402)")
    return applied


class PgLedger:
    """Synchronous PostgreSQL access for one engine instance; use through
    :class:`engine.store.ledger.AsyncLedger` (which runs calls in worker threads)."""

    journal: Journal | None = None  # none: the database is the durable copy
    replayed = 0
    salvaged: SalvageReport | None = None
    concurrency = 4  # calls in flight at once (each on its own pooled connection)
    dialect: Literal["postgres"] = "postgres"

    def __init__(self, dsn: str, *, name: str = "", lease_s: float = 10.0) -> None:
        self.lease_s = lease_s
        self.name = name or socket.gethostname()
        # One plain connection first: an unreachable database or a refused login is one clear
        # error at once, not the pool's retries for half a minute
        psycopg.connect(dsn, connect_timeout=10).close()
        self._pool = psycopg_pool.ConnectionPool(
            dsn,
            min_size=1,
            max_size=self.concurrency + 1,
            open=False,
            kwargs={"autocommit": False},
            name="x402-ledger",
        )
        self._pool.open(wait=True, timeout=30)
        with self._pool.connection() as con:
            version = schema_version(con)
            if version != pg_schema.CURRENT:
                raise SchemaMismatch(
                    f"the PostgreSQL ledger is at schema version {version}, this engine runs"
                    f" {pg_schema.CURRENT}: run `x402-engine ledger migrate --config ...` first"
                    if version < pg_schema.CURRENT
                    else f"the PostgreSQL ledger is at schema version {version}, newer than this"
                    f" engine's {pg_schema.CURRENT}: run the newer engine"
                )
            sync = con.execute("SHOW synchronous_commit").fetchone()
            if sync is None or sync[0] == "off":
                raise SchemaMismatch(
                    "synchronous_commit is off for the ledger's role/database: an acknowledged"
                    " payment could be lost; set it to on (or remote_apply with replicas)"
                )
            con.commit()
        self.instance_id = self._register()

    # -- instances ----------------------------------------------------------------------------

    def _register(self) -> int:
        with self._tx() as con:
            first, _ = _take_block(con, "instance", 1)
            con.execute(
                "INSERT INTO instances (id, name, host, pid) VALUES (%s, %s, %s, %s)",
                [first, self.name, socket.gethostname(), os.getpid()],
            )
        log.info("registered as instance %d (%s)", first, self.name)
        return first

    def heartbeat(self) -> None:
        """Prove this instance alive and renew its signer leases; raises :class:`Superseded`
        once another instance took it over."""
        with self._tx() as con:
            row = con.execute(
                "UPDATE instances SET heartbeat_at = now() WHERE id = %s RETURNING successor",
                [self.instance_id],
            ).fetchone()
            if row is None or row[0] is not None:
                raise Superseded(
                    f"instance {self.instance_id} was taken over by instance"
                    f" {row[0] if row else '?'} (its heartbeat was older than the lease)"
                )
            con.execute(
                "UPDATE signer_leases SET expires_at = now() + make_interval(secs => %s)"
                " WHERE instance_id = %s",
                [self.lease_s, self.instance_id],
            )

    def lease_signers(self, chain_id: int, signers: Sequence[str], most: int) -> dict[str, int]:
        """Lease up to ``most`` of ``signers`` that no live instance holds (or that this one
        holds); returns signer -> epoch, the fencing token of each."""
        out: dict[str, int] = {}
        with self._tx() as con:
            for signer in signers:
                if len(out) >= most:
                    break
                row = con.execute(
                    """
                    INSERT INTO signer_leases (chain_id, signer, instance_id, epoch, expires_at)
                    VALUES (%(c)s, %(s)s, %(me)s, 1, now() + make_interval(secs => %(l)s))
                    ON CONFLICT (chain_id, signer) DO UPDATE
                        SET instance_id = EXCLUDED.instance_id,
                            epoch = signer_leases.epoch + 1,
                            expires_at = EXCLUDED.expires_at
                        WHERE signer_leases.expires_at < now()
                           OR signer_leases.instance_id = EXCLUDED.instance_id
                    RETURNING epoch
                    """,
                    {"c": chain_id, "s": signer.lower(), "me": self.instance_id, "l": self.lease_s},
                ).fetchone()
                if row is not None:
                    out[signer] = int(row[0])
        return out

    def commands_since(self, after: int) -> list[tuple[int, str, str | None]]:
        """Operator commands (``sweep``) issued after command ``after``: (id, kind, payee)."""
        with self._read() as con:
            rows = con.execute(
                "SELECT id, kind, payee FROM commands WHERE id > %s ORDER BY id", [after]
            ).fetchall()
        return [(int(r[0]), str(r[1]), r[2]) for r in rows]

    def last_command(self) -> int:
        with self._read() as con:
            row = con.execute("SELECT coalesce(max(id), 0) FROM commands").fetchone()
        return int(row[0]) if row else 0

    def ack_command(self, command_id: int, waiting: int) -> None:
        with self._tx() as con:
            con.execute(
                "INSERT INTO command_acks (command_id, instance_id, waiting) VALUES (%s, %s, %s)"
                " ON CONFLICT DO NOTHING",
                [command_id, self.instance_id, waiting],
            )

    def leases_of(self, chain_id: int, owners: Sequence[int]) -> list[str]:
        """The signer accounts ``owners`` (taken-over instances) leased on a chain."""
        with self._read() as con:
            rows = con.execute(
                "SELECT signer FROM signer_leases WHERE chain_id = %s AND instance_id = ANY(%s)",
                [chain_id, list(owners)],
            ).fetchall()
        return [str(r[0]) for r in rows]

    def release(self) -> None:
        """A clean stop: leases freed at once, the instance marked stopped. Its open work stays
        recorded under it; the next instance with its name (or any survivor, after the lease)
        takes it over."""
        with self._tx() as con:
            con.execute("DELETE FROM signer_leases WHERE instance_id = %s", [self.instance_id])
            con.execute(
                "UPDATE instances SET stopped_at = now(),"
                " heartbeat_at = now() - make_interval(secs => %s) WHERE id = %s",
                [self.lease_s * 2, self.instance_id],
            )

    def take_over(self, same_name_only: bool = False) -> list[int]:
        """Take over instances whose heartbeat is older than the lease (``same_name_only``:
        only earlier instances of this name, stopped or silent: a restart resumes its own
        work). One survivor wins each (the row update is atomic). Returns the ids whose open
        work is now this instance's: the taken ones and those they had taken before."""
        with self._tx() as con:
            self._check_alive(con)
            if same_name_only:
                rows = con.execute(
                    "UPDATE instances SET successor = %(me)s, taken_over_at = now()"
                    " WHERE successor IS NULL AND id <> %(me)s AND name = %(name)s"
                    " AND (stopped_at IS NOT NULL OR heartbeat_at < now() - make_interval("
                    "secs => %(l)s)) RETURNING id",
                    {"me": self.instance_id, "name": self.name, "l": self.lease_s},
                ).fetchall()
            else:
                rows = con.execute(
                    "UPDATE instances SET successor = %(me)s, taken_over_at = now()"
                    " WHERE successor IS NULL AND id <> %(me)s"
                    " AND heartbeat_at < now() - make_interval(secs => %(l)s) RETURNING id",
                    {"me": self.instance_id, "l": self.lease_s},
                ).fetchall()
            taken = [int(r[0]) for r in rows]
            if not taken:
                return []
            owned = con.execute(
                """
                WITH RECURSIVE owned(id) AS (
                    SELECT id FROM instances WHERE id = ANY(%s)
                    UNION SELECT i.id FROM instances i JOIN owned o ON i.successor = o.id
                )
                SELECT id FROM owned ORDER BY id
                """,
                [taken],
            ).fetchall()
        log.warning("took over instance(s) %s", taken)
        return [int(r[0]) for r in owned]

    # -- writes -------------------------------------------------------------------------------

    def insert_payments(
        self, rows: Sequence[JournalRow], credit: Mapping[int, int] | None = None
    ) -> dict[int, Clash]:
        """Record accepted payments in one transaction (one multi-row INSERT; with credit rows,
        a few statements more). Returns the rows not recorded as ours: another instance holds
        the replay key (its record id, identical or not), or, for rows in ``credit`` (row id ->
        the payer's limit), the payer's unsettled value across all instances would exceed it."""
        if not rows:
            return {}
        # In replay-key order: each insert locks its key until commit, and instances recording
        # the same payments (a client sending one to all of them) must take those locks in the
        # same order, or PostgreSQL breaks the deadlock by failing one instance's whole group.
        rows = sorted(rows, key=lambda row: row[1].key)
        with self._tx() as con:
            out = self._credit_gate(con, rows, credit) if credit else {}
            keep = [r for r in rows if r[0] not in out]
            inserted = self._insert_rows(con, keep)
            clashes = [(r[0], r[1]) for r in keep if r[0] not in inserted]
            if clashes:
                out.update(self._rival_records(con, clashes))
            counted = [r for r in keep if credit and r[0] in credit and r[0] in inserted]
            if counted:
                con.execute(
                    "INSERT INTO credit_open (payment_id, chain_id, token, payer, value)"
                    " SELECT * FROM unnest(%s::bigint[], %s::bigint[], %s::text[], %s::text[],"
                    " %s::numeric[])",
                    [
                        [r[0] for r in counted],
                        [r[1].chain_id for r in counted],
                        [hex_addr(r[1].token) for r in counted],
                        [hex_addr(r[1].payer) for r in counted],
                        [str(r[1].value) for r in counted],
                    ],
                )
            return out

    def _credit_gate(
        self, con: psycopg.Connection[Any], rows: Sequence[JournalRow], credit: Mapping[int, int]
    ) -> dict[int, Clash]:
        """Lock the payers of credit rows (sorted: no deadlock between instances), read what
        they owe unsettled across the cluster, and refuse the rows that would exceed."""
        keys = sorted(
            {
                (p.chain_id, hex_addr(p.token), hex_addr(p.payer))
                for rid, p, _ in rows
                if rid in credit
            }
        )
        columns = [[k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys]]
        con.execute(
            "INSERT INTO payer_locks (chain_id, token, payer) SELECT * FROM unnest(%s::bigint[],"
            " %s::text[], %s::text[]) ON CONFLICT DO NOTHING",
            columns,
        )
        con.execute(
            "SELECT 1 FROM payer_locks WHERE (chain_id, token, payer) IN (SELECT * FROM"
            " unnest(%s::bigint[], %s::text[], %s::text[])) ORDER BY chain_id, token, payer"
            " FOR UPDATE",
            columns,
        )
        owed: dict[tuple[int, str, str], int] = {
            (int(r[0]), str(r[1]), str(r[2])): int(r[3])
            for r in con.execute(
                "SELECT chain_id, token, payer, sum(value)::text FROM credit_open"
                " WHERE (chain_id, token, payer) IN (SELECT * FROM unnest(%s::bigint[],"
                " %s::text[], %s::text[])) GROUP BY 1, 2, 3",
                columns,
            ).fetchall()
        }
        refused: dict[int, Clash] = {}
        for rid, p, _ in rows:
            if rid not in credit:
                continue
            key = (p.chain_id, hex_addr(p.token), hex_addr(p.payer))
            already = owed.get(key, 0)
            if already + p.value > credit[rid]:
                refused[rid] = Clash(
                    refusal=f"unsettled {already} + {p.value} across all instances exceeds"
                    f" the payer's limit {credit[rid]} (balance or cap)"
                )
            else:
                owed[key] = already + p.value
        return refused

    def _insert_rows(self, con: psycopg.Connection[Any], rows: Sequence[JournalRow]) -> set[int]:
        """One multi-row INSERT, fenced; returns the ids inserted (the rest clashed)."""
        if not rows:
            self._check_alive(con)
            return set()
        payments = [r[1] for r in rows]
        row = con.execute(
            """
            WITH alive AS (
                SELECT id FROM instances WHERE id = %(me)s AND successor IS NULL FOR SHARE
            ), incoming AS (
                SELECT * FROM unnest(
                    %(id)s::bigint[], %(at)s::bigint[], %(chain)s::bigint[], %(net)s::text[],
                    %(ver)s::smallint[], %(token)s::text[], %(payer)s::text[],
                    %(payee)s::text[], %(value)s::numeric[], %(va)s::numeric[],
                    %(vb)s::numeric[], %(nonce)s::bytea[], %(sig)s::bytea[],
                    %(method)s::smallint[], %(permitted)s::numeric[], %(space)s::text[]
                ) AS u(id, at, chain, net, ver, token, payer, payee, value, va, vb, nonce, sig,
                       method, permitted, space)
            ), ins AS (
                INSERT INTO payments (id, instance_id, accepted_at_ms, chain_id, network,
                    x402_version, token, payer, payee, value, valid_after, valid_before,
                    nonce, signature, method, permitted, nonce_space)
                SELECT i.id, a.id, i.at, i.chain, i.net, i.ver, i.token, i.payer, i.payee,
                       i.value, i.va, i.vb, i.nonce, i.sig, i.method, i.permitted, i.space
                FROM incoming i CROSS JOIN alive a
                ON CONFLICT ON CONSTRAINT payments_replay_key DO NOTHING
                RETURNING id
            )
            SELECT (SELECT count(*) FROM alive), (SELECT array_agg(id) FROM ins)
            """,
            {
                "me": self.instance_id,
                "id": [r[0] for r in rows],
                "at": [r[2] for r in rows],
                "chain": [p.chain_id for p in payments],
                "net": [p.network for p in payments],
                "ver": [p.x402_version for p in payments],
                "token": [hex_addr(p.token) for p in payments],
                "payer": [hex_addr(p.payer) for p in payments],
                "payee": [hex_addr(p.payee) for p in payments],
                "value": [str(p.value) for p in payments],
                "va": [str(p.valid_after) for p in payments],
                "vb": [str(p.valid_before) for p in payments],
                "nonce": [p.nonce for p in payments],
                "sig": [p.signature for p in payments],
                "method": [p.method for p in payments],
                "permitted": [str(p.permitted) if p.method else None for p in payments],
                "space": [hex_addr(p.nonce_space) for p in payments],
            },
        ).fetchone()
        assert row is not None
        if not row[0]:
            raise Superseded(f"instance {self.instance_id} was taken over: not recorded")
        return set(row[1] or [])

    def _rival_records(
        self, con: psycopg.Connection[Any], clashes: list[tuple[int, Payment]]
    ) -> dict[int, Clash]:
        found = con.execute(
            """
            SELECT p.id, p.chain_id, p.nonce_space, p.payer, p.nonce, p.payee, p.value::text,
                   p.valid_after::text, p.valid_before::text, p.signature, p.token, p.method,
                   coalesce(p.permitted, 0)::text
            FROM payments p JOIN unnest(%s::bigint[], %s::text[], %s::text[], %s::bytea[])
                AS k(chain_id, space, payer, nonce)
                ON p.chain_id = k.chain_id AND p.nonce_space = k.space AND p.payer = k.payer
                   AND p.nonce = k.nonce
            """,
            [
                [p.chain_id for _, p in clashes],
                [hex_addr(p.nonce_space) for _, p in clashes],
                [hex_addr(p.payer) for _, p in clashes],
                [p.nonce for _, p in clashes],
            ],
        ).fetchall()
        by_key = {(int(f[1]), f[2], f[3], bytes(f[4])): f for f in found}
        out: dict[int, Clash] = {}
        for rid, p in clashes:
            f = by_key.get((p.chain_id, hex_addr(p.nonce_space), hex_addr(p.payer), p.nonce))
            if f is None:  # cannot be: the conflict was on this key
                raise RuntimeError(f"payment {rid}: replay key conflict but no record found")
            same = (
                f[5] == hex_addr(p.payee)
                and int(f[6]) == p.value
                and int(f[7]) == p.valid_after
                and int(f[8]) == p.valid_before
                and bytes(f[9]) == p.signature
                and f[10] == hex_addr(p.token)
                and int(f[11]) == p.method
                and int(f[12]) == p.permitted
            )
            out[rid] = Clash(owner=int(f[0]), identical=same)
        return out

    def bind_identifier(self, identifier: str, key: bytes, valid_before: int) -> bytes:
        """Bind a payment-identifier to the payment with replay key ``key`` unless an instance
        bound it before; returns the key it is bound to (``key``, or the earlier one)."""
        with self._tx() as con:
            row = con.execute(
                """
                WITH ins AS (
                    INSERT INTO identifiers (identifier, replay_key, valid_before)
                    VALUES (%(i)s, %(k)s, %(v)s) ON CONFLICT (identifier) DO NOTHING
                    RETURNING replay_key
                )
                SELECT replay_key FROM ins
                UNION ALL SELECT replay_key FROM identifiers WHERE identifier = %(i)s
                LIMIT 1
                """,
                {"i": identifier, "k": key, "v": str(valid_before)},
            ).fetchone()
        assert row is not None
        return bytes(row[0])

    def append_events(self, events: Sequence[PaymentEvent], at_ms: int) -> None:
        if events:
            self._retrying(lambda con: _write_events(con, events, at_ms))

    def record_batch_sent(
        self,
        batch: BatchRecord,
        events: Sequence[PaymentEvent],
        at_ms: int,
        lease_epoch: int | None = None,
    ) -> None:
        """Write-ahead, fenced: the signed transaction and its items' ``submitted`` events,
        only while this instance holds the signer's lease at ``lease_epoch``."""

        def work(con: psycopg.Connection[Any]) -> None:
            if lease_epoch is not None:
                held = con.execute(
                    "SELECT 1 FROM signer_leases WHERE chain_id = %s AND signer = %s"
                    " AND instance_id = %s AND epoch = %s FOR SHARE",
                    [batch.chain_id, batch.signer.lower(), self.instance_id, lease_epoch],
                ).fetchone()
                if held is None:
                    raise LeaseLost(
                        f"signer {batch.signer} on chain {batch.chain_id} is no longer leased"
                        f" to instance {self.instance_id} (epoch {lease_epoch})"
                    )
            con.execute(
                "INSERT INTO batches (id, instance_id, chain_id, created_at_ms, mode, signer,"
                " account_nonce, item_count, gas_limit, max_fee_per_gas, tx_hash, raw_tx,"
                " payment_ids) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (id) DO NOTHING",
                [
                    batch.id,
                    self.instance_id,
                    batch.chain_id,
                    at_ms,
                    batch.mode,
                    batch.signer,
                    batch.account_nonce,
                    len(batch.payment_ids),
                    batch.gas_limit,
                    batch.max_fee_per_gas,
                    batch.tx_hash,
                    batch.raw_tx,
                    batch.payment_ids,
                ],
            )
            _write_batch_event(con, BatchEvent(batch.id, "sent", tx_hash=batch.tx_hash), at_ms)
            _write_events(con, events, at_ms)

        # Retried through a database restart like every event: each attempt checks the lease
        # again in its own transaction, so a signer taken over meanwhile raises LeaseLost and
        # the transaction, written ahead of its broadcast, is never sent.
        self._retrying(work)

    def record_batch_final(
        self, event: BatchEvent, events: Sequence[PaymentEvent], at_ms: int
    ) -> None:
        def work(con: psycopg.Connection[Any]) -> None:
            _write_batch_event(con, event, at_ms)
            _write_events(con, events, at_ms)

        self._retrying(work)

    def reserve_payment_ids(self, count: int, at_ms: int = 0) -> tuple[int, int]:
        """A block of ``count`` payment ids no other instance gets: (first, last)."""
        with self._tx() as con:
            return _take_block(con, "payment", count)

    def reserve_batch_ids(self, count: int) -> tuple[int, int]:
        """Like payment ids, but a batch formed while the database restarts waits for it
        (the batch stage has nowhere to hand the error: it would stop the instance)."""
        taken: list[tuple[int, int]] = []
        self._retrying(lambda con: taken.append(_take_block(con, "batch", count)))
        return taken[-1]

    def record_replacement(self, batch_id: int, tx_hash: str, raw_tx: bytes, at_ms: int) -> None:
        self._retrying(
            lambda con: con.execute(
                "INSERT INTO batch_transactions (batch_id, at_ms, tx_hash, raw_tx)"
                " VALUES (%s, %s, %s, %s)",
                [batch_id, at_ms, tx_hash, raw_tx],
            )
        )

    def record_sales(self, sales: Sequence[Sale], at_ms: int) -> set[int]:
        """Record sales; returns the payment ids another instance sold first (those rows are
        not written: one payment, one purchase across instances)."""
        if not sales:
            return set()
        sales = sorted(sales, key=lambda sale: sale.payment_id)  # one lock order everywhere
        with self._tx() as con:
            rows = con.execute(
                """
                INSERT INTO sales (payment_id, at_ms, mode, identifier, instance_id)
                SELECT u.pid, %s, u.mode, u.ident, %s
                FROM unnest(%s::bigint[], %s::text[], %s::text[]) AS u(pid, mode, ident)
                ON CONFLICT (payment_id) DO NOTHING
                RETURNING payment_id
                """,
                [
                    at_ms,
                    self.instance_id,
                    [s.payment_id for s in sales],
                    [s.mode for s in sales],
                    [s.identifier for s in sales],
                ],
            ).fetchall()
        written = {int(r[0]) for r in rows}
        return {s.payment_id for s in sales} - written

    def bind_chain(self, chain_id: int, binding: Mapping[str, str], at_ms: int) -> dict[str, str]:
        """Record the subjects of ``binding`` (subject -> hash) the chain has no binding for
        yet; a subject another instance bound first (even at this moment) keeps its hash.
        Returns the chain's binding as committed, to be judged again by the caller."""
        if binding:
            with self._tx() as con:
                con.execute(
                    "INSERT INTO chain_bindings (chain_id, subject, hash, bound_at_ms)"
                    " SELECT %s::bigint, u.subject, u.hash, %s::bigint"
                    " FROM unnest(%s::text[], %s::text[]) AS u(subject, hash)"
                    " ON CONFLICT (chain_id, subject) DO NOTHING",
                    [chain_id, at_ms, list(binding), list(binding.values())],
                )
        return self.chain_binding(chain_id)

    # -- reads --------------------------------------------------------------------------------

    def chain_binding(self, chain_id: int) -> dict[str, str]:
        """The chain's binding: subject ('genesis', or a batcher address) -> hash."""
        with self._read() as con:
            rows = con.execute(
                "SELECT subject, hash FROM chain_bindings WHERE chain_id = %s", [chain_id]
            ).fetchall()
        return {str(r[0]): str(r[1]) for r in rows}

    def live_sales(self, valid_before_min: int, owners: Sequence[int] | None = None) -> list[Sale]:
        with self._read() as con:
            rows = con.execute(
                "SELECT s.payment_id, s.mode, s.identifier FROM sales s"
                " JOIN payments p ON p.id = s.payment_id WHERE p.valid_before >= %s"
                " AND p.instance_id = ANY(%s) ORDER BY s.payment_id",
                [valid_before_min, list(owners or [self.instance_id])],
            ).fetchall()
        return [Sale(int(r[0]), str(r[1]), r[2]) for r in rows]

    def sale(self, payment_id: int) -> Sale | None:
        with self._read() as con:
            row = con.execute(
                "SELECT payment_id, mode, identifier FROM sales WHERE payment_id = %s",
                [payment_id],
            ).fetchone()
        return None if row is None else Sale(int(row[0]), str(row[1]), row[2])

    def recover(self, owners: Sequence[int] | None = None) -> Recovered:
        """The open work of ``owners`` (default: this instance): payments to queue again,
        batches to reconcile. Ids come from blocks, so the next-id fields are unused (0)."""
        ids = list(owners or [self.instance_id])
        with self._read() as con:
            rows = con.execute(
                """
                WITH mine AS (SELECT * FROM payments WHERE instance_id = ANY(%(o)s)),
                last AS (
                    SELECT DISTINCT ON (e.payment_id) e.payment_id, e.state, e.batch_id
                    FROM payment_events e JOIN mine m ON m.id = e.payment_id
                    ORDER BY e.payment_id, e.seq DESC
                )
                SELECT p.id, p.accepted_at_ms, p.chain_id, p.network, p.x402_version,
                       p.token, p.payer, p.payee, p.value::text, p.valid_after::text,
                       p.valid_before::text, p.nonce, p.signature, p.method,
                       p.permitted::text, coalesce(last.state, 'accepted'), last.batch_id
                FROM mine p LEFT JOIN last ON p.id = last.payment_id
                WHERE last.state IS NULL OR last.state NOT IN ('settled', 'failed')
                ORDER BY p.id
                """,
                {"o": ids},
            ).fetchall()
            batch_rows = con.execute(
                """
                WITH last AS (
                    SELECT DISTINCT ON (e.batch_id) e.batch_id, e.state
                    FROM batch_events e JOIN batches b ON b.id = e.batch_id
                    WHERE b.instance_id = ANY(%(o)s)
                    ORDER BY e.batch_id, e.seq DESC
                )
                SELECT b.id, b.chain_id, b.mode, b.signer, b.account_nonce, b.gas_limit,
                       b.max_fee_per_gas::text, b.tx_hash, b.raw_tx, b.payment_ids
                FROM batches b JOIN last ON b.id = last.batch_id
                WHERE last.state = 'sent' ORDER BY b.id
                """,
                {"o": ids},
            ).fetchall()
            batches = [batch_from_row(r) for r in batch_rows]
            replacements: dict[int, list[tuple[str, bytes]]] = {}
            if batches:
                for batch_id, tx_hash, raw in con.execute(
                    "SELECT batch_id, tx_hash, raw_tx FROM batch_transactions"
                    " WHERE batch_id = ANY(%s) ORDER BY batch_id, at_ms, tx_hash",
                    [[b.id for b in batches]],
                ).fetchall():
                    replacements.setdefault(int(batch_id), []).append((str(tx_hash), bytes(raw)))
        shared: dict[Any, Any] = {}
        payments = [open_payment_from_row(r, shared) for r in rows]
        return Recovered(payments, batches, 0, 0, replacements)

    def live_final_payments(
        self, valid_before_min: int, owners: Sequence[int] | None = None
    ) -> list[tuple[int, Payment]]:
        with self._read() as con:
            rows = con.execute(
                "SELECT id, chain_id, network, x402_version, token, payer, payee, value::text,"
                " valid_after::text, valid_before::text, nonce, signature, method,"
                " permitted::text FROM payments"
                " WHERE valid_before >= %s AND instance_id = ANY(%s) AND id IN (SELECT"
                " payment_id FROM payment_events WHERE state IN ('settled', 'failed'))"
                " ORDER BY id",
                [valid_before_min, list(owners or [self.instance_id])],
            ).fetchall()
        shared: dict[Any, Any] = {}
        return [(int(r[0]), payment_from_row(r[1:14], shared)) for r in rows]

    def outcome(self, payment_id: int) -> Outcome | None:
        with self._read() as con:
            row = con.execute(
                """
                SELECT p.id, coalesce(e.state, 'accepted'), p.chain_id, p.payer, p.payee,
                       p.value::text, e.tx_hash, e.block_number, e.gas_used, e.reason, e.message
                FROM payments p LEFT JOIN LATERAL (
                    SELECT * FROM payment_events WHERE payment_id = p.id
                    ORDER BY seq DESC LIMIT 1
                ) e ON true
                WHERE p.id = %s
                """,
                [payment_id],
            ).fetchone()
        if row is None:
            return None
        return outcome_from_row(row)

    def history(self, payment_id: int) -> list[dict[str, Any]]:
        with self._read() as con:
            cur = con.execute(
                "SELECT at_ms, state, batch_id, tx_hash, block_number, gas_used,"
                " fee_wei::text AS fee_wei, reason, message"
                " FROM payment_events WHERE payment_id = %s ORDER BY seq",
                [payment_id],
            )
            names = [d.name for d in cur.description or []]
            return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]

    def query(self, sql: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        return self.query_with_columns(sql, params)[1]

    def query_with_columns(
        self, sql: str, params: Sequence[Any] | None = None
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Read-only SQL (a read-only transaction: a report cannot change the ledger)."""
        with self._pool.connection() as con:
            con.read_only = True
            try:
                cur = con.execute(_qmark_to_format(sql) if params else sql, params or None)
                names = [d.name for d in cur.description or []]
                return names, cur.fetchall()
            finally:
                con.rollback()
                con.read_only = False

    def stage(self, rows: Sequence[JournalRow]) -> int:
        raise AssertionError("no journal: payments are committed by insert_payments")

    def staged_count(self) -> int:
        return 0

    def flush_staged(self) -> int:
        return 0

    def close(self) -> None:
        """Release this instance's leases (a clean stop) and close the pool."""
        try:
            self.release()
        except (psycopg.Error, Superseded) as exc:  # away or superseded: leases just expire
            log.warning("could not release instance %d cleanly: %s", self.instance_id, exc)
        self._pool.close()

    # -- internals ----------------------------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[psycopg.Connection[Any]]:
        """One transaction on a pooled connection, committed on success."""
        with self._pool.connection() as con, con.transaction():
            yield con

    @contextmanager
    def _read(self) -> Iterator[psycopg.Connection[Any]]:
        with self._pool.connection() as con:
            try:
                yield con
            finally:
                con.rollback()

    def _check_alive(self, con: psycopg.Connection[Any]) -> None:
        row = con.execute(
            "SELECT 1 FROM instances WHERE id = %s AND successor IS NULL FOR SHARE",
            [self.instance_id],
        ).fetchone()
        if row is None:
            raise Superseded(f"instance {self.instance_id} was taken over: nothing recorded")

    def _retrying(self, work: Callable[[psycopg.Connection[Any]], object]) -> None:
        """Run ``work`` in a fenced transaction; while the database is unreachable, retry for
        up to :data:`RETRY_FOR_S` – events are facts about the chain that must be recorded,
        and the engine waits rather than crash on a database restart."""
        deadline = time.monotonic() + RETRY_FOR_S
        delay = 0.1
        while True:
            try:
                with self._tx() as con:
                    self._check_alive(con)
                    work(con)
                return
            except (psycopg.OperationalError, psycopg.InterfaceError, psycopg_pool.PoolTimeout):
                if time.monotonic() > deadline:
                    raise
                log.warning("ledger database unreachable; retrying in %.1f s", delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)


class PgReader:
    """Read-only access for reports and ad hoc SQL while instances serve (no registration, a
    read-only transaction per query: nothing it runs can change the ledger)."""

    dialect: Literal["postgres"] = "postgres"

    def __init__(self, dsn: str) -> None:
        self._con = psycopg.connect(dsn, autocommit=False)
        self._con.read_only = True

    def query_with_columns(
        self, sql: str, params: Sequence[Any] | None = None
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        try:
            cur = self._con.execute(_qmark_to_format(sql) if params else sql, params or None)
            return [d.name for d in cur.description or []], cur.fetchall()
        finally:
            self._con.rollback()

    def query(self, sql: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        return self.query_with_columns(sql, params)[1]

    def close(self) -> None:
        self._con.close()


# DuckDB table -> (PostgreSQL columns, DuckDB select list); events keep their order.
_COPIED: list[tuple[str, str, str]] = [
    (
        "payments",
        "id, instance_id, accepted_at_ms, chain_id, network, x402_version, token, payer, payee,"
        " value, valid_after, valid_before, nonce, signature, method, permitted, nonce_space",
        "id, $instance, accepted_at_ms, chain_id, network, x402_version, token, payer, payee,"
        " value::VARCHAR, valid_after::VARCHAR, valid_before::VARCHAR, nonce, signature,"
        " coalesce(method, 0), permitted::VARCHAR,"
        " CASE WHEN coalesce(method, 0) = 0 THEN token ELSE $permit2 END"
        " FROM payments ORDER BY id",
    ),
    (
        "payment_events",
        "payment_id, at_ms, state, batch_id, tx_hash, block_number, gas_used, fee_wei, reason,"
        " message",
        "payment_id, at_ms, state, batch_id, tx_hash, block_number, gas_used, fee_wei::VARCHAR,"
        " reason, message FROM payment_events ORDER BY seq",
    ),
    (
        "batches",
        "id, instance_id, chain_id, created_at_ms, mode, signer, account_nonce, item_count,"
        " gas_limit, max_fee_per_gas, tx_hash, raw_tx, payment_ids",
        "id, $instance, chain_id, created_at_ms, mode, signer, account_nonce, item_count,"
        " gas_limit, max_fee_per_gas::VARCHAR, tx_hash, raw_tx, payment_ids FROM batches"
        " ORDER BY id",
    ),
    (
        "batch_events",
        "batch_id, at_ms, state, tx_hash, block_number, gas_used, effective_gas_price, message",
        "batch_id, at_ms, state, tx_hash, block_number, gas_used,"
        " effective_gas_price::VARCHAR, message FROM batch_events ORDER BY seq",
    ),
    (
        "batch_transactions",
        "batch_id, at_ms, tx_hash, raw_tx",
        "batch_id, at_ms, tx_hash, raw_tx FROM batch_transactions ORDER BY batch_id, at_ms",
    ),
    (
        "sales",
        "payment_id, at_ms, mode, identifier, instance_id",
        "payment_id, at_ms, mode, identifier, $instance FROM sales ORDER BY payment_id",
    ),
    (  # the chain the copied history happened on stays the one the ledger refuses others for
        "chain_bindings",
        "chain_id, subject, hash, bound_at_ms",
        "chain_id, subject, hash, bound_at_ms FROM chain_bindings ORDER BY chain_id, subject",
    ),
]


def copy_from_duckdb(dsn: str, source: Any, name: str) -> dict[str, int]:
    """Move a DuckDB ledger (``source``: an open :class:`engine.store.ledger.Ledger`, its
    journal already replayed) into an empty, migrated PostgreSQL ledger, in one transaction.

    The copied work is recorded under a stopped instance called ``name``: an instance started
    with that name resumes it at once (any other takes it over after the lease). Id counters
    continue above every copied id (and above the DuckDB ledger's id reservations). Returns the
    rows copied per table, each checked against the source's count."""
    copied: dict[str, int] = {}
    with psycopg.connect(dsn) as con, con.transaction():
        if schema_version(con) != pg_schema.CURRENT:
            raise SchemaMismatch("run `x402-engine ledger migrate` on the target first")
        existing = con.execute("SELECT count(*) FROM payments").fetchone()
        if existing is None or existing[0]:
            raise RuntimeError(
                "the PostgreSQL ledger already holds payments: copy into an empty one"
            )
        instance, _ = _take_block(con, "instance", 1)
        con.execute(
            "INSERT INTO instances (id, name, host, pid, stopped_at, heartbeat_at)"
            " VALUES (%s, %s, %s, 0, now(), now() - interval '1 day')",
            [instance, name, "ledger copy"],
        )
        for table, columns, select in _COPIED:
            select = select.replace("$instance", str(instance))
            select = select.replace("$permit2", f"'{hex_addr(PERMIT2)}'")
            rows = source.query(f"SELECT {select}")
            with con.cursor() as cur, cur.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            counted = con.execute(f"SELECT count(*) FROM {table}").fetchone()
            source_count = source.query(f"SELECT count(*) FROM {table}")[0][0]
            if counted is None or counted[0] != source_count:
                raise RuntimeError(f"{table}: copied {counted} rows of {source_count}; rolled back")
            copied[table] = int(source_count)
        ceilings = source.query(
            "SELECT greatest(coalesce((SELECT max(id) FROM payments), 0),"
            " coalesce((SELECT max(ceiling) FROM id_reservations), 0)),"
            " coalesce((SELECT max(id) FROM batches), 0)"
        )[0]
        con.execute("UPDATE counters SET value = %s WHERE name = 'payment'", [int(ceilings[0])])
        con.execute("UPDATE counters SET value = %s WHERE name = 'batch'", [int(ceilings[1])])
    return copied


def issue_command(dsn: str, kind: str, payee: str | None) -> int:
    """An operator command every live instance runs on its next heartbeat; returns its id."""
    with psycopg.connect(dsn) as con:
        row = con.execute(
            "INSERT INTO commands (kind, payee) VALUES (%s, %s) RETURNING id", [kind, payee]
        ).fetchone()
        assert row is not None
        return int(row[0])


class CommandProgress(msgspec.Struct, frozen=True):
    live: int  # instances heartbeating within the lease
    acked: int  # of them, those that ran the command
    waiting: int  # payments they reported waiting when they ran it
    open: int  # payments of the payee (or all) not yet final, cluster-wide


def command_progress(
    dsn: str, command_id: int, lease_s: float, payee: str | None
) -> CommandProgress:
    with psycopg.connect(dsn) as con:
        row = con.execute(
            """
            SELECT
              (SELECT count(*) FROM instances WHERE successor IS NULL AND stopped_at IS NULL
                 AND heartbeat_at > now() - make_interval(secs => %(l)s)),
              (SELECT count(*) FROM command_acks a JOIN instances i ON i.id = a.instance_id
                 WHERE a.command_id = %(c)s AND i.successor IS NULL AND i.stopped_at IS NULL),
              (SELECT coalesce(sum(waiting), 0) FROM command_acks WHERE command_id = %(c)s),
              (SELECT count(*) FROM payments p
                 WHERE (%(payee)s::text IS NULL OR p.payee = %(payee)s)
                 AND NOT EXISTS (SELECT 1 FROM payment_events e WHERE e.payment_id = p.id
                                 AND e.state IN ('settled', 'failed')))
            """,
            {"l": lease_s, "c": command_id, "payee": payee},
        ).fetchone()
    assert row is not None
    return CommandProgress(int(row[0]), int(row[1]), int(row[2]), int(row[3]))


def _take_block(con: psycopg.Connection[Any], name: str, count: int) -> tuple[int, int]:
    row = con.execute(
        "UPDATE counters SET value = value + %s WHERE name = %s RETURNING value", [count, name]
    ).fetchone()
    assert row is not None
    last = int(row[0])
    return last - count + 1, last


def _write_events(con: psycopg.Connection[Any], events: Sequence[PaymentEvent], at_ms: int) -> None:
    if not events:
        return
    final = [e.payment_id for e in events if e.state in ("settled", "failed")]
    if final:  # what the payer owed for these is owed no more (idempotent: a delete)
        con.execute("DELETE FROM credit_open WHERE payment_id = ANY(%s)", [final])
    con.execute(
        """
        INSERT INTO payment_events (payment_id, at_ms, state, batch_id, tx_hash, block_number,
            gas_used, fee_wei, reason, message)
        SELECT u.pid, %s, u.state, u.batch, u.tx, u.block, u.gas, u.fee, u.reason, u.message
        FROM unnest(%s::bigint[], %s::text[], %s::bigint[], %s::text[], %s::bigint[],
                    %s::bigint[], %s::numeric[], %s::text[], %s::text[])
            WITH ORDINALITY AS u(pid, state, batch, tx, block, gas, fee, reason, message, n)
        ORDER BY u.n
        """,
        [
            at_ms,
            [e.payment_id for e in events],
            [e.state for e in events],
            [e.batch_id for e in events],
            [e.tx_hash for e in events],
            [e.block_number for e in events],
            [e.gas_used for e in events],
            [None if e.fee_wei is None else str(e.fee_wei) for e in events],
            [e.reason for e in events],
            [e.message for e in events],
        ],
    )


def _write_batch_event(con: psycopg.Connection[Any], event: BatchEvent, at_ms: int) -> None:
    con.execute(
        "INSERT INTO batch_events (batch_id, at_ms, state, tx_hash, block_number, gas_used,"
        " effective_gas_price, message) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
        [
            event.batch_id,
            at_ms,
            event.state,
            event.tx_hash,
            event.block_number,
            event.gas_used,
            event.effective_gas_price,
            event.message,
        ],
    )


def _qmark_to_format(sql: str) -> str:
    """Reports are written with DuckDB's ``?`` placeholders; psycopg takes ``%s``."""
    return sql.replace("%", "%%").replace("?", "%s")
