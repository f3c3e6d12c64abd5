"""Credit control on a real anvil: deferred payments never lend a payer more than they hold, and a
payer who drains their balance mid-day is settled early with the shortfall recorded."""

from __future__ import annotations

import time
from pathlib import Path

import msgspec
import pytest
import trio

from engine.chain import codec
from engine.chain.rpc import Rpc
from engine.config import CreditConfig, EngineConfig, PolicyConfig
from engine.dev.devchain import Anvil, Deployer, DevChain, engine_config, new_key, setup_devchain
from engine.dev.loadgen import payment_v2
from engine.engine import Engine
from engine.model import Accepted, Rejected
from engine.rules import reasons
from engine.rules.credit import CreditBook
from engine.stages.verify import Verifier

from .chain import balances

pytestmark = pytest.mark.chain
VALUE = 1000


def _far_schedule() -> str:
    """A daily settlement time twelve hours away: it never fires during a test."""
    return time.strftime("%H:%M", time.gmtime(time.time() + 12 * 3600))


def _config(dev: DevChain, path: Path, credit: CreditConfig) -> tuple[EngineConfig, dict[str, str]]:
    config, env = engine_config(
        dev, str(path), policy=PolicyConfig(mode="scheduled", times_utc=[_far_schedule()])
    )
    return msgspec.structs.replace(config, credit=credit), env


def test_book_lends_up_to_the_balance_and_the_cap() -> None:
    book = CreditBook(balance_max_age_s=60, payer_cap=2500)
    key = (b"\x01" * 20, b"\x02" * 20)
    assert book.check(key, 1) is not None  # balance never read: no credit
    assert book.stale([key], 0.0) == [key]
    book.set_balance(key, 2000, now=0.0)
    assert book.stale([key], 59.0) == [] and book.stale([key], 61.0) == [key]
    book.reserve(key, 1500)
    assert book.check(key, 500) is None
    assert "balance" in (book.check(key, 501) or "")
    book.set_balance(key, 10_000, now=1.0)
    assert "cap" in (book.check(key, 1001) or "")
    book.set_balance(key, 1000, now=2.0)
    assert [(s.owed, s.balance) for s in book.shortfalls()] == [(1500, 1000)]
    book.release(key, 1500)
    assert book.debtors() == [] and book.shortfalls() == []


@pytest.mark.parametrize(("cap", "accepted_max"), [(0, 5), (2500, 2)])
async def test_payer_is_refused_beyond_balance_or_cap_and_replays_still_pass(
    anvil: Anvil, tmp_path: Path, cap: int, accepted_max: int
) -> None:
    dev = await setup_devchain(anvil.url, payers=1, payer_balance=5 * VALUE)
    config, env = _config(dev, tmp_path / "l.duckdb", CreditConfig(payer_cap=cap))
    key = dev.payer_key_bytes()[0]
    payee = bytes.fromhex(dev.payee[2:])
    now = int(time.time())
    work = [payment_v2(dev.domain, key, payee, VALUE, now) for _ in range(6)]
    async with Engine.open(config, environ=env) as engine:
        results = [await engine.submit(*w) for w in work]
        accepted = [r for r in results if isinstance(r, Accepted)]
        refused = [r for r in results if isinstance(r, Rejected)]
        assert len(accepted) == accepted_max
        assert {r.reason for r in refused} == {reasons.INSUFFICIENT_FUNDS}
        assert ("cap" if cap else "balance") in refused[0].message
        replay = await engine.submit(*work[0])  # already on record: not new credit
        assert isinstance(replay, Accepted) and replay.duplicate
        # /verify applies the same credit control (the chain alone would call it valid)
        _, verdict = await engine.verify(*payment_v2(dev.domain, key, payee, VALUE, now))
        assert verdict is not None and verdict.reason == reasons.INSUFFICIENT_FUNDS, verdict
        assert "unsettled" in verdict.message
        # deferred: every accepted payment waits in the payee's pool for the schedule
        with trio.fail_after(10):
            while sum(engine.queue_depths().values()) < len(accepted):
                await trio.sleep(0.02)
        assert engine.statistics().batches_sent == 0 and engine.statistics().settled == 0


async def test_payer_who_drains_their_balance_is_settled_early_and_the_shortfall_recorded(
    anvil: Anvil, tmp_path: Path
) -> None:
    dev = await setup_devchain(anvil.url, payers=2, payer_balance=5 * VALUE)
    config, env = _config(dev, tmp_path / "l.duckdb", CreditConfig(refresh_s=0.3))
    keys = dev.payer_key_bytes()
    payee = bytes.fromhex(dev.payee[2:])
    now = int(time.time())
    rpc = Rpc(anvil.url)
    async with Engine.open(config, environ=env) as engine:
        drained = [payment_v2(dev.domain, keys[0], payee, VALUE, now) for _ in range(3)]
        steady = [payment_v2(dev.domain, keys[1], payee, VALUE, now) for _ in range(2)]
        results = await engine.submit_many(drained + steady)
        assert all(isinstance(r, Accepted) for r in results)
        # The payer spends 4,000 of their 5,000 elsewhere: they now owe 3,000 holding 1,000.
        elsewhere = bytes.fromhex(new_key().hex()[:40])
        spend, spend_req = payment_v2(dev.domain, keys[0], elsewhere, 4 * VALUE, now)
        payment, rejected = Verifier(config).check(spend, spend_req, now)
        assert payment is not None, rejected
        deployer = Deployer(rpc, bytes.fromhex(dev.deployer_key[2:]), dev.chain_id)
        await deployer.send(dev.token, codec.transfer_calldata(payment))
        await engine.until(lambda s: s.settled + sum(s.failed.values()) >= 3, timeout_s=30)
        stats = engine.statistics()
        assert stats.settled == 1 and stats.failed == {reasons.INSUFFICIENT_FUNDS: 2}
        rows = await engine.query(
            "SELECT sum(p.value)::BIGINT FROM payments p JOIN payment_events e"
            " ON e.payment_id = p.id WHERE e.state = 'failed' AND e.reason = ?",
            [reasons.INSUFFICIENT_FUNDS],
        )
        assert rows == [(2 * VALUE,)]  # the uncollected amount
        # The other payer's payments still wait for the schedule.
        assert engine.queue_depths() == {dev.chain_id: 2}
    assert (await balances(rpc, dev.token, [dev.payee]))[0] >= VALUE
    await rpc.aclose()


async def test_sweep_command_settles_a_stopped_engines_waiting_payments(
    anvil: Anvil, tmp_path: Path
) -> None:
    """The day's payments wait in the ledger for a schedule hours away; ``x402-engine sweep``
    reopens the engine, settles them all now and exits 0."""
    from engine.cli import main as cli_main
    from engine.config import dump_config

    dev = await setup_devchain(anvil.url, payers=5, payer_balance=5 * VALUE)
    config, env = _config(dev, tmp_path / "l.duckdb", CreditConfig())
    payee = bytes.fromhex(dev.payee[2:])
    now = int(time.time())
    work = [payment_v2(dev.domain, k, payee, VALUE, now) for k in dev.payer_key_bytes() * 3]
    async with Engine.open(config, environ=env) as engine:
        assert all(isinstance(r, Accepted) for r in await engine.submit_many(work))
        assert engine.statistics().batches_sent == 0
    cfg, env_file = tmp_path / "e.toml", tmp_path / "signer.env"
    cfg.write_bytes(dump_config(config))
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    rpc = Rpc(anvil.url)
    before = (await balances(rpc, dev.token, [dev.payee]))[0]
    code = await trio.to_thread.run_sync(
        cli_main, ["sweep", "--config", str(cfg), "--env-file", str(env_file), "--timeout", "60"]
    )
    assert code == 0
    after = (await balances(rpc, dev.token, [dev.payee]))[0]
    assert after - before == 15 * VALUE
    await rpc.aclose()
