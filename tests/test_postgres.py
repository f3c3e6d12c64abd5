"""The PostgreSQL ledger: the same guarantees as DuckDB, shared by several engine instances
(a real PostgreSQL server and a real anvil)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import pytest
import trio

from engine.chain.rpc import Rpc
from engine.config import EngineConfig, LedgerConfig, PolicyConfig
from engine.dev.devchain import Anvil, DevChain, engine_config, setup_devchain
from engine.dev.loadgen import payment_v2
from engine.engine import Engine
from engine.model import Accepted, Rejected
from engine.rules import reasons
from engine.store import pg_schema
from engine.store.postgres import PgLedger, SchemaMismatch, migrate

from .chain import balances, count_authorization_used

pytestmark = pytest.mark.chain
VALUE = 1000


def _pg_config(
    dev: DevChain,
    dsn: str,
    name: str,
    *,
    lease_s: float = 10.0,
    policy: PolicyConfig | None = None,
    **chain: Any,
) -> tuple[EngineConfig, dict[str, str]]:
    config, env = engine_config(dev, ":unused:", policy=policy, **chain)
    ledger = LedgerConfig(backend="postgres", instance_name=name, lease_s=lease_s)
    env["X402_LEDGER_DSN"] = dsn
    return msgspec.structs.replace(config, ledger=ledger), env


def test_migrations_are_versioned_idempotent_and_checked_at_start(postgres: Any) -> None:
    name = f"m{int(time.time() * 1000) % 10**9}"
    with psycopg.connect(postgres.dsn, autocommit=True) as con:
        con.execute(f"CREATE DATABASE {name}")
    dsn = postgres.dsn.rsplit("/", 1)[0] + "/" + name
    with pytest.raises(SchemaMismatch, match="ledger migrate"):
        PgLedger(dsn)  # an empty database: refused, with the command that fixes it
    assert migrate(dsn) == [v for v, _, _ in pg_schema.MIGRATIONS]
    assert migrate(dsn) == []  # already current
    ledger = PgLedger(dsn, name="a")
    try:
        assert ledger.instance_id >= 1
    finally:
        ledger.close()
    with psycopg.connect(dsn, autocommit=True) as con:
        con.execute("UPDATE schema_migrations SET version = version + 100")
    with pytest.raises(SchemaMismatch, match="newer"):
        PgLedger(dsn)


async def test_one_instance_settles_on_postgres_like_on_duckdb(
    anvil: Anvil, pg_dsn: str, tmp_path: Path
) -> None:
    dev = await setup_devchain(anvil.url, payers=20)
    config, env = _pg_config(dev, pg_dsn, "solo")
    keys = dev.payer_key_bytes()
    payee = bytes.fromhex(dev.payee[2:])
    now = int(time.time())
    work = [payment_v2(dev.domain, keys[i % len(keys)], payee, VALUE, now) for i in range(60)]
    rpc = Rpc(anvil.url)
    before = (await balances(rpc, dev.token, [dev.payee]))[0]
    async with Engine.open(config, environ=env) as engine:
        results = await engine.submit_many(work)
        assert all(isinstance(r, Accepted) and not r.duplicate for r in results)
        again = await engine.submit(*work[0])  # the replay is the same record
        first = results[0]
        assert isinstance(again, Accepted) and isinstance(first, Accepted)
        assert again.duplicate and again.id == first.id
        await engine.drain(timeout_s=60)
        assert engine.statistics().settled == 60
        rows = await engine.query(
            "SELECT count(*), count(DISTINCT p.id) FROM payments p"
            " JOIN payment_events e ON e.payment_id = p.id WHERE e.state = 'settled'"
        )
        assert rows == [(60, 60)]
    assert (await balances(rpc, dev.token, [dev.payee]))[0] - before == 60 * VALUE
    # the ids handed out survive: a second start continues above them, with nothing open
    async with Engine.open(config, environ=env) as engine:
        fresh = await engine.submit(*payment_v2(dev.domain, keys[0], payee, VALUE, now))
        assert isinstance(fresh, Accepted)
        assert fresh.id > max(r.id for r in results if isinstance(r, Accepted))
        await engine.drain(timeout_s=60)
    await rpc.aclose()


async def test_two_instances_accept_the_same_payment_once_and_sell_it_once(
    anvil: Anvil, pg_dsn: str
) -> None:
    dev = await setup_devchain(anvil.url, payers=4, signers=2)
    # the identical payment reaches both instances at once; each holds one of the two signers
    config_a, env = _pg_config(dev, pg_dsn, "a", signers_per_instance=1)
    config_b, _ = _pg_config(dev, pg_dsn, "b", signers_per_instance=1)
    keys = dev.payer_key_bytes()
    payee = bytes.fromhex(dev.payee[2:])
    now = int(time.time())
    same = [payment_v2(dev.domain, keys[i % 4], payee, VALUE, now) for i in range(40)]
    rpc = Rpc(anvil.url)
    before = (await balances(rpc, dev.token, [dev.payee]))[0]
    async with Engine.open(config_a, environ=env) as a, Engine.open(config_b, environ=env) as b:
        answers: dict[str, list[Accepted | Rejected]] = {}

        async def send(name: str, engine: Engine) -> None:
            answers[name] = await engine.submit_many(same)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send, "a", a)
            nursery.start_soon(send, "b", b)
        for left, right in zip(answers["a"], answers["b"], strict=True):
            assert isinstance(left, Accepted) and isinstance(right, Accepted), (left, right)
            assert left.id == right.id  # one record
            assert left.duplicate != right.duplicate  # exactly one of them recorded it
        # a different authorization with a nonce only the other instance recorded: the
        # database's unique key refuses it (b's own index has never seen the nonce)
        solo = payment_v2(dev.domain, keys[0], payee, VALUE, now)
        assert isinstance(await a.submit(*solo), Accepted)
        nonce = bytes.fromhex(solo[0].payload.eip3009.nonce[2:])
        rival = payment_v2(dev.domain, keys[0], payee, VALUE + 1, now, nonce=nonce)
        refused = await b.submit(*rival)
        assert isinstance(refused, Rejected) and refused.reason == reasons.NONCE_USED
        # ... and the identical one is that record
        echo = await b.submit(*solo)
        assert isinstance(echo, Accepted) and echo.duplicate
        # one payment, one purchase across instances: of two settles, one success
        settles = await _settle_both(a, b, same[1])
        assert sorted(s.success for s in settles) == [False, True], settles
        loser = next(s for s in settles if not s.success)
        assert loser.reason == reasons.DUPLICATE_SETTLEMENT
        await a.drain(timeout_s=60)
        await b.drain(timeout_s=60)
        settled = await a.query(
            "SELECT count(DISTINCT payment_id) FROM payment_events WHERE state = 'settled'"
        )
        assert settled == [(41,)]
    for payload, _ in same:
        auth = payload.payload.eip3009
        payer, nonce = bytes.fromhex(auth.from_[2:]), bytes.fromhex(auth.nonce[2:])
        assert await count_authorization_used(rpc, dev.token, payer, nonce) == 1
    assert (await balances(rpc, dev.token, [dev.payee]))[0] - before == 41 * VALUE
    await rpc.aclose()


async def _settle_both(a: Engine, b: Engine, work: tuple[Any, Any]) -> list[Any]:
    out: list[Any] = []

    async def one(engine: Engine) -> None:
        out.append(await engine.settle(*work))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, a)
        nursery.start_soon(one, b)
    return out


async def test_a_silent_instance_is_taken_over_and_its_payments_settled(
    anvil: Anvil, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    dev = await setup_devchain(anvil.url, payers=10, signers=2)
    # a: batches only after a long wait, so its payments are still unbatched when it dies
    slow = PolicyConfig(max_batch_size=400, max_wait_ms=600_000)
    config_a, env = _pg_config(dev, pg_dsn, "a", lease_s=1.0, policy=slow, signers_per_instance=1)
    config_b, _ = _pg_config(dev, pg_dsn, "b", lease_s=1.0, signers_per_instance=1)
    keys = dev.payer_key_bytes()
    payee = bytes.fromhex(dev.payee[2:])
    now = int(time.time())
    work = [payment_v2(dev.domain, keys[i % 10], payee, VALUE, now) for i in range(30)]
    rpc = Rpc(anvil.url)
    before = (await balances(rpc, dev.token, [dev.payee]))[0]
    async with Engine.open(config_b, environ=env) as b:
        with trio.CancelScope() as crash:
            async with Engine.open(config_a, environ=env) as a:
                accepted = await a.submit_many(work)
                assert all(isinstance(r, Accepted) for r in accepted)
                # a "crash": no clean release, no more heartbeats
                monkeypatch.setattr(PgLedger, "release", lambda self: None)
                crash.cancel()
        started = time.monotonic()
        for result in accepted:
            assert isinstance(result, Accepted)
            outcome = await b.wait(result.id, timeout_s=60)
            assert outcome.state == "settled", outcome
        took = time.monotonic() - started
        assert b._membership is not None and b._membership.takeovers == 1
    assert took < 1.0 + 10.0, took  # the lease, then a poll and a batch
    assert (await balances(rpc, dev.token, [dev.payee]))[0] - before == 30 * VALUE
    await rpc.aclose()


async def test_ledger_copy_moves_a_duckdb_ledger_into_postgres_with_nothing_lost(
    anvil: Anvil, pg_dsn: str, tmp_path: Path
) -> None:
    import subprocess
    import sys

    from engine.config import dump_config

    dev = await setup_devchain(anvil.url, payers=10)
    hourly = PolicyConfig(mode="windowed", window_s=3600)
    duck, env = engine_config(dev, str(tmp_path / "ledger.duckdb"), policy=hourly)
    keys = dev.payer_key_bytes()
    payee = bytes.fromhex(dev.payee[2:])
    now = int(time.time())
    work = [payment_v2(dev.domain, keys[i % 10], payee, VALUE, now) for i in range(20)]
    rpc = Rpc(anvil.url)
    before = (await balances(rpc, dev.token, [dev.payee]))[0]
    async with Engine.open(duck, environ=env) as engine:
        settled_first = await engine.submit_many(work[:10])
        engine.settle_now()
        for r in settled_first:
            assert isinstance(r, Accepted)
            assert (await engine.wait(r.id, timeout_s=60)).state == "settled"
        waiting = await engine.submit_many(work[10:])  # left for a later window
        assert all(isinstance(r, Accepted) for r in waiting)
    pg, pg_env = _pg_config(dev, pg_dsn, "moved", policy=hourly)
    (tmp_path / "pg.toml").write_bytes(dump_config(pg))
    (tmp_path / "pg.env").write_text("".join(f"{k}={v}\n" for k, v in pg_env.items()))
    command = [sys.executable, "-m", "engine.cli", "ledger", "copy", "--config"]
    command += [str(tmp_path / "pg.toml"), "--env-file", str(tmp_path / "pg.env")]
    command += ["--from", str(tmp_path / "ledger.duckdb")]

    def copy() -> subprocess.CompletedProcess[str]:
        return subprocess.run(command, capture_output=True, text=True, check=False)

    done = await trio.to_thread.run_sync(copy)
    assert done.returncode == 0, done.stderr
    assert "20 payments" in done.stdout, done.stdout
    again = await trio.to_thread.run_sync(copy)
    assert again.returncode != 0 and "already holds payments" in again.stderr
    async with Engine.open(pg, environ=pg_env) as engine:
        # the copied history is this instance's: replays are the same records, the waiting
        # payments settle here, ids continue above the copied ones
        replay = await engine.submit(*work[0])
        first = settled_first[0]
        assert isinstance(replay, Accepted) and isinstance(first, Accepted)
        assert replay.duplicate and replay.id == first.id
        assert engine.settle_now() == 10
        for r in waiting:
            assert isinstance(r, Accepted)
            assert (await engine.wait(r.id, timeout_s=60)).state == "settled"
        fresh = await engine.submit(*payment_v2(dev.domain, keys[0], payee, VALUE, now))
        assert isinstance(fresh, Accepted)
        assert fresh.id > max(r.id for r in waiting if isinstance(r, Accepted))
        engine.settle_now()
        await engine.drain(timeout_s=60)
    assert (await balances(rpc, dev.token, [dev.payee]))[0] - before == 21 * VALUE
    await rpc.aclose()


async def test_a_payer_cannot_spread_credit_over_instances_beyond_their_balance(
    anvil: Anvil, pg_dsn: str
) -> None:
    from engine.config import CreditConfig

    # one payer holding 5 payments' worth; payments wait for an hourly window (credit control
    # applies), sent alternately to two instances: each alone would lend up to the balance
    dev = await setup_devchain(anvil.url, payers=1, payer_balance=5 * VALUE, signers=2)
    hourly = PolicyConfig(mode="windowed", window_s=3600)
    configs = []
    for name in ("a", "b"):
        config, env = _pg_config(dev, pg_dsn, name, policy=hourly, signers_per_instance=1)
        credit = CreditConfig(refresh_s=0.5, balance_max_age_s=0.2)
        configs.append(msgspec.structs.replace(config, credit=credit))
    key = dev.payer_key_bytes()[0]
    payee = bytes.fromhex(dev.payee[2:])
    now = int(time.time())
    work = [payment_v2(dev.domain, key, payee, VALUE, now) for _ in range(10)]
    async with (
        Engine.open(configs[0], environ=env) as a,
        Engine.open(configs[1], environ=env) as b,
    ):
        results: list[tuple[Engine, Accepted | Rejected]] = []
        for i, w in enumerate(work):
            engine = a if i % 2 == 0 else b
            results.append((engine, await engine.submit(*w)))
        accepted = [(e, r) for e, r in results if isinstance(r, Accepted)]
        refused = [r for _, r in results if isinstance(r, Rejected)]
        assert len(accepted) == 5, results
        assert {r.reason for r in refused} == {reasons.INSUFFICIENT_FUNDS}
        assert any("across all instances" in r.message for r in refused), refused
        # settled, nothing is owed any more ...
        a.settle_now()
        b.settle_now()
        for engine, r in accepted:
            assert (await engine.wait(r.id, 60)).state == "settled"
        with psycopg.connect(pg_dsn) as con:
            assert con.execute("SELECT count(*) FROM credit_open").fetchone() == (0,)
        # ... and the balance is spent (read again: older than 0.2 s): the next one is refused
        await trio.sleep(0.3)
        more = await b.submit(*payment_v2(dev.domain, key, payee, VALUE, now))
        assert isinstance(more, Rejected) and more.reason == reasons.INSUFFICIENT_FUNDS, more


async def test_a_payment_identifier_is_bound_across_instances(anvil: Anvil, pg_dsn: str) -> None:
    dev = await setup_devchain(anvil.url, payers=2, signers=2)
    config_a, env = _pg_config(dev, pg_dsn, "a", signers_per_instance=1)
    config_b, _ = _pg_config(dev, pg_dsn, "b", signers_per_instance=1)
    keys = dev.payer_key_bytes()
    payee = bytes.fromhex(dev.payee[2:])
    now = int(time.time())
    ext = {"payment-identifier": {"info": {"id": "order-7f3a9c2e-0001"}}}
    paid, paid_req = payment_v2(dev.domain, keys[0], payee, VALUE, now)
    other, other_req = payment_v2(dev.domain, keys[1], payee, VALUE, now)
    paid = msgspec.structs.replace(paid, extensions=ext)
    other = msgspec.structs.replace(other, extensions=ext)
    async with Engine.open(config_a, environ=env) as a, Engine.open(config_b, environ=env) as b:
        first = await a.settle(paid, paid_req)
        assert first.success, first
        # the same id with another payment, at the other instance: refused, not accepted
        clash = await b.settle(other, other_req)
        assert not clash.success and clash.reason == reasons.PAYMENT_ID_CONFLICT, clash
        assert await b.query("SELECT count(*) FROM payments") == [(1,)]
        # the same purchase retried at the other instance: the stored answer
        retry = await b.settle(paid, paid_req)
        assert retry.success and retry.settlement_id == first.settlement_id, retry
        assert retry.transaction == first.transaction


def test_batch_ids_and_fee_bumps_wait_out_a_database_restart(postgres: Any, pg_dsn: str) -> None:
    """The batch stage and the fee bump have no one to hand a database error to: a batch id
    reserved, or a replacement recorded, while the server restarts waits for it to return
    (an instance stopped with "terminating connection due to administrator command" when its
    first batch formed during a restart)."""
    import threading

    ledger = PgLedger(pg_dsn, name="restart")
    try:
        first = ledger.reserve_batch_ids(4)
        postgres.stop()
        restarted = threading.Timer(1.0, postgres.start)
        restarted.start()
        try:
            later = ledger.reserve_batch_ids(4)  # while the server is down: waits, then answers
        finally:
            restarted.join()
        assert later[0] > first[1]
        ledger.record_replacement(later[0], "0x" + "ab" * 32, b"raw", 1)
    finally:
        ledger.close()


def test_instances_recording_the_same_payments_in_other_orders_never_deadlock(
    pg_dsn: str,
) -> None:
    """Three instances each receive the same payments (a client sending every payment to all
    of them) and record them in their own arrival order. The inserts lock replay keys; in
    different orders, two transactions can each hold a key the other wants: PostgreSQL then
    aborts one, and its whole group was answered 'not accepted' (seen once in CI as an
    unexpected_settle_error where duplicate_settlement was due)."""
    import os
    import random
    import threading

    from engine.model import Payment

    ledgers = [PgLedger(pg_dsn, name=f"order{i}") for i in range(3)]
    token, payee = os.urandom(20), os.urandom(20)
    failures: list[BaseException] = []
    try:
        for round_ in range(30):
            payments = [
                Payment(
                    chain_id=8453,
                    token=token,
                    payer=os.urandom(20),
                    payee=payee,
                    value=1000,
                    valid_after=1,
                    valid_before=2_000_000_000,
                    nonce=os.urandom(32),
                    signature=os.urandom(65),
                    network="eip155:8453",
                    x402_version=2,
                )
                for _ in range(40)
            ]
            start = threading.Barrier(len(ledgers))

            def record(
                n: int,
                ledger: PgLedger,
                payments: list[Payment] = payments,
                round_: int = round_,
                start: threading.Barrier = start,
            ) -> None:
                order = payments[:]
                random.Random(round_ * 10 + n).shuffle(order)
                first_id = (round_ * 3 + n) * 1000 + 1
                rows = [(first_id + i, p, 0) for i, p in enumerate(order)]
                start.wait()
                try:
                    ledger.insert_payments(rows)
                except BaseException as exc:
                    failures.append(exc)

            threads = [
                threading.Thread(target=record, args=(n, ledger))
                for n, ledger in enumerate(ledgers)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert not failures, failures[0]
            with psycopg.connect(pg_dsn) as con:
                count = con.execute(
                    "SELECT count(*) FROM payments WHERE token = %s", ["0x" + token.hex()]
                ).fetchone()
            assert count is not None and count[0] == 40 * (round_ + 1)  # each recorded once
    finally:
        for ledger in ledgers:
            ledger.close()
