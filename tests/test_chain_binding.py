"""A ledger is bound to its chain at first use (chain id, genesis block hash, the code hash of
each batcher it settles through) and refuses to start against another: a devchain reset keeps
the chain id and the deploy addresses, and a ledger trusted across it answers ``success`` for
payments settled on a chain that no longer exists."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import trio

from engine.chain import crypto
from engine.chain.rpc import Rpc
from engine.cli import main
from engine.clock import ManualClock
from engine.config import ChainConfig, EngineConfig, LedgerConfig, TokenConfig, dump_config
from engine.dev.devchain import Anvil, DevChain, engine_config, setup_devchain
from engine.dev.loadgen import payment_v2
from engine.engine import Engine
from engine.model import Accepted, ChainMismatch, hex_addr
from engine.recovery import GENESIS, bind_ledger, judge_binding
from engine.sim import fakechain
from engine.store.ledger import AsyncLedger, Ledger
from engine.store.postgres import PgLedger

SEED = b"chain-binding"
VALUE = 1000
RESET_GENESIS_TIME = "1700000000"  # the second anvil's genesis: never the first one's
GEN_A = "0x" + "aa" * 32
GEN_B = "0x" + "bb" * 32
BATCHER = "0x" + "11" * 20
UPTO = "0x" + "22" * 20
CODE_A = "0x" + "c1" * 32
CODE_B = "0x" + "c2" * 32


def _judge(
    recorded: dict[str, str], observed: dict[str, str | None]
) -> tuple[dict[str, str], str | None]:
    verdict = judge_binding(
        recorded,
        observed,
        chain_id=31337,
        ledger="ledger ledger.duckdb",
        rpc_url="http://node:8545",
    )
    return verdict.record, verdict.refusal


# -- the decision (pure) ------------------------------------------------------------------


def test_an_unbound_ledger_records_the_genesis_and_every_batcher_with_code() -> None:
    record, refusal = _judge({}, {GENESIS: GEN_A, BATCHER: CODE_A, UPTO: CODE_B})
    assert refusal is None
    assert record == {GENESIS: GEN_A, BATCHER: CODE_A, UPTO: CODE_B}


def test_the_same_chain_records_nothing_and_is_accepted() -> None:
    bound = {GENESIS: GEN_A, BATCHER: CODE_A}
    assert _judge(bound, {GENESIS: GEN_A, BATCHER: CODE_A}) == ({}, None)


def test_another_genesis_is_refused_in_one_line_naming_both() -> None:
    record, refusal = _judge({GENESIS: GEN_A, BATCHER: CODE_A}, {GENESIS: GEN_B, BATCHER: CODE_A})
    assert refusal is not None and "\n" not in refusal
    assert refusal.startswith("ledger ledger.duckdb belongs to chain 31337 with genesis " + GEN_A)
    assert f"http://node:8545 has genesis {GEN_B}" in refusal
    assert "a reset or another chain" in refusal and "new ledger path" in refusal
    assert record == {}


def test_the_genesis_is_judged_before_the_batchers() -> None:
    _, refusal = _judge({GENESIS: GEN_A, BATCHER: CODE_A}, {GENESIS: GEN_B, BATCHER: None})
    assert refusal is not None and "genesis" in refusal


def test_a_bound_batcher_with_other_code_is_refused_naming_it() -> None:
    bound = {GENESIS: GEN_A, BATCHER: CODE_A, UPTO: CODE_A}
    _, refusal = _judge(bound, {GENESIS: GEN_A, BATCHER: CODE_A, UPTO: CODE_B})
    assert refusal is not None and "\n" not in refusal
    assert UPTO in refusal and CODE_A in refusal and CODE_B in refusal
    assert BATCHER not in refusal


def test_a_bound_batcher_without_code_now_is_refused() -> None:
    _, refusal = _judge({GENESIS: GEN_A, BATCHER: CODE_A}, {GENESIS: GEN_A, BATCHER: None})
    assert refusal is not None and BATCHER in refusal and "no code" in refusal


def test_a_newly_configured_batcher_is_recorded_not_refused() -> None:
    record, refusal = _judge({GENESIS: GEN_A, BATCHER: CODE_A}, {GENESIS: GEN_A, UPTO: CODE_B})
    assert refusal is None and record == {UPTO: CODE_B}


def test_a_batcher_without_code_is_not_bound() -> None:
    record, refusal = _judge({}, {GENESIS: GEN_A, BATCHER: None})
    assert refusal is None and record == {GENESIS: GEN_A}


def test_hashes_and_addresses_compare_case_insensitively() -> None:
    bound = {GENESIS: GEN_A, BATCHER: CODE_A}
    observed: dict[str, str | None] = {GENESIS: GEN_A.upper(), BATCHER.upper(): CODE_A.upper()}
    assert _judge(bound, observed) == ({}, None)


# -- binding against the simulator ----------------------------------------------------------


def _sim_chain(upto: str = "") -> tuple[ChainConfig, fakechain.FakeChain]:
    token, batcher = bytes([0xAA] * 20), bytes([0xBB] * 20)
    chain = fakechain.FakeChain(
        1, ManualClock(1_700_000_000), chain_id=31337, token=token, batcher=batcher
    )
    config = ChainConfig(
        chain_id=31337,
        rpc_url="sim://fake-chain",
        batcher=hex_addr(batcher),
        tokens=[TokenConfig(address=hex_addr(token), name="USD Coin", version="2")],
        signer_key_envs=["SIM_SIGNER"],
        upto_batcher=upto,
    )
    return config, chain


async def test_a_ledger_is_bound_once_and_refuses_other_batcher_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "sim.duckdb")
    config, chain = _sim_chain(upto=UPTO)  # the upto batcher has no code: not bound
    ledger = AsyncLedger(Ledger(path))
    await bind_ledger(config, chain, ledger, f"ledger {path}", 5)
    code_hash = hex_addr(crypto.keccak256(fakechain.BATCHER_CODE))
    assert ledger.sync.chain_binding(31337) == {
        GENESIS: "0x" + "00" * 32,
        config.batcher: code_hash,
    }
    await bind_ledger(config, chain, ledger, f"ledger {path}", 6)  # the same chain: nothing changes
    assert ledger.sync.query("SELECT count(*), max(bound_at_ms) FROM chain_bindings") == [(2, 5)]
    ledger.sync.close()

    ledger = AsyncLedger(Ledger(path))  # the binding is durable
    monkeypatch.setattr(fakechain, "BATCHER_CODE", b"\x60\x80another batcher")
    with pytest.raises(ChainMismatch, match=f"through the batcher {config.batcher}") as refused:
        await bind_ledger(config, chain, ledger, f"ledger {path}", 7)
    assert code_hash in str(refused.value) and "\n" not in str(refused.value)
    ledger.sync.close()


async def test_a_ledger_without_a_binding_is_bound_at_its_next_start(tmp_path: Path) -> None:
    """A ledger from before the binding (or whose binding was never written) is bound to the
    chain it meets next; nothing can check the past."""
    path = str(tmp_path / "old.duckdb")
    old = Ledger(path)
    old.query("SELECT 1")
    old._con.execute("DROP TABLE chain_bindings")  # as written before the binding existed
    old.close()
    config, chain = _sim_chain()
    ledger = AsyncLedger(Ledger(path))  # gains the table
    assert ledger.sync.chain_binding(31337) == {}
    await bind_ledger(config, chain, ledger, f"ledger {path}", 1)
    assert set(ledger.sync.chain_binding(31337)) == {GENESIS, config.batcher}
    ledger.sync.close()


# -- a real devchain reset ------------------------------------------------------------------


async def _deploy(url: str) -> DevChain:
    return await setup_devchain(url, payers=2, seed=SEED, with_permit2=True)


async def _settle_one(config: EngineConfig, env: dict[str, str], dev: DevChain) -> None:
    payee = bytes.fromhex(dev.payee[2:])
    payload, req = payment_v2(dev.domain, dev.payer_key_bytes()[0], payee, VALUE, int(time.time()))
    async with Engine.open(config, environ=env) as engine:
        accepted = await engine.submit(payload, req)
        assert isinstance(accepted, Accepted)
        assert (await engine.wait(accepted.id, timeout_s=60)).state == "settled"


@pytest.fixture
def reset_anvil() -> Iterator[Anvil]:
    """A second devchain: the same chain id, a new genesis (as after an anvil restart)."""
    with Anvil(extra_args=["--timestamp", RESET_GENESIS_TIME]) as node:
        yield node


@pytest.mark.chain
async def test_a_ledger_refuses_a_reset_devchain_and_reopens_on_its_own(
    anvil: Anvil, reset_anvil: Anvil, tmp_path: Path
) -> None:
    ledger = str(tmp_path / "ledger.duckdb")
    dev = await _deploy(anvil.url)
    config, env = engine_config(dev, ledger)
    await _settle_one(config, env, dev)
    async with Engine.open(config, environ=env) as engine:  # the same chain: accepted
        bound = await engine.query(
            "SELECT chain_id, subject, hash FROM chain_bindings ORDER BY subject"
        )
    rpc = Rpc(anvil.url)
    genesis = await rpc.block_hash(0)
    await rpc.aclose()
    assert (31337, GENESIS, genesis) in bound
    assert {s for _, s, _ in bound} == {GENESIS, dev.batcher.lower(), dev.upto_batcher.lower()}

    fresh = await _deploy(reset_anvil.url)
    assert (fresh.chain_id, fresh.batcher, fresh.token) == (dev.chain_id, dev.batcher, dev.token)
    reset_config, reset_env = engine_config(fresh, ledger)
    with pytest.raises(ChainMismatch) as refused:
        async with Engine.open(reset_config, environ=reset_env):
            pytest.fail("the engine started on a ledger of another chain")
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"ledger {ledger} belongs to chain 31337 with genesis {genesis}")
    assert f"{reset_anvil.url} has genesis 0x" in message

    async with Engine.open(config, environ=env) as engine:  # and its own chain still is fine
        rows = await engine.query("SELECT count(*) FROM payment_events WHERE state = 'settled'")
        assert rows == [(1,)]


@pytest.mark.chain
def test_the_command_line_refuses_a_reset_devchain_in_one_line(
    anvil: Anvil, reset_anvil: Anvil, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ledger = str(tmp_path / "ledger.duckdb")

    async def setup() -> tuple[Path, Path]:
        dev = await _deploy(anvil.url)
        config, env = engine_config(dev, ledger)
        async with Engine.open(config, environ=env):
            pass  # bound at first use
        fresh = await _deploy(reset_anvil.url)
        reset_config, reset_env = engine_config(fresh, ledger)
        cfg, env_file = tmp_path / "reset.toml", tmp_path / "reset.env"
        cfg.write_bytes(dump_config(reset_config))
        env_file.write_text("".join(f"{k}={v}\n" for k, v in reset_env.items()))
        return cfg, env_file

    cfg, env_file = trio.run(setup)
    capsys.readouterr()
    code = main(["sweep", "--config", str(cfg), "--env-file", str(env_file), "--timeout", "30"])
    out, err = capsys.readouterr()
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"x402-engine sweep: ledger {ledger} belongs to chain 31337")
    assert f"{reset_anvil.url} has genesis" in lines[0]
    assert "Traceback" not in err + out


# -- the PostgreSQL ledger ------------------------------------------------------------------


def _pg_config(dev: DevChain, dsn: str, name: str) -> tuple[EngineConfig, dict[str, str]]:
    config, env = engine_config(dev, ":unused:")
    env["X402_LEDGER_DSN"] = dsn
    ledger = LedgerConfig(backend="postgres", instance_name=name)
    return msgspec.structs.replace(config, ledger=ledger), env


@pytest.mark.chain
async def test_a_postgres_ledger_refuses_a_reset_devchain(
    anvil: Anvil, reset_anvil: Anvil, pg_dsn: str
) -> None:
    dev = await _deploy(anvil.url)
    config, env = _pg_config(dev, pg_dsn, "bound")
    await _settle_one(config, env, dev)
    fresh = await _deploy(reset_anvil.url)
    reset_config, reset_env = _pg_config(fresh, pg_dsn, "bound")
    with pytest.raises(ChainMismatch) as refused:
        async with Engine.open(reset_config, environ=reset_env):
            pytest.fail("the engine started on a ledger of another chain")
    message = str(refused.value)
    assert message.startswith("the PostgreSQL ledger belongs to chain 31337 with genesis")
    assert f"{reset_anvil.url} has genesis" in message and "\n" not in message
    async with Engine.open(config, environ=env) as engine:  # its own chain: accepted
        rows = await engine.query("SELECT count(*) FROM payment_events WHERE state = 'settled'")
        assert rows == [(1,)]


def test_concurrent_postgres_bindings_keep_the_first(pg_dsn: str) -> None:
    """Two instances binding at once with different observations: one binding wins, and both
    read that one back (the loser then refuses to start)."""
    first, second = PgLedger(pg_dsn, name="a"), PgLedger(pg_dsn, name="b")
    try:
        assert first.chain_binding(31337) == {}
        kept = first.bind_chain(31337, {GENESIS: GEN_A, BATCHER: CODE_A}, 1)
        assert kept == {GENESIS: GEN_A, BATCHER: CODE_A}
        again = second.bind_chain(31337, {GENESIS: GEN_B, BATCHER: CODE_B, UPTO: CODE_B}, 2)
        assert again == {GENESIS: GEN_A, BATCHER: CODE_A, UPTO: CODE_B}
        assert second.chain_binding(31337) == again and second.chain_binding(1) == {}
        _, refusal = _judge(again, {GENESIS: GEN_B, BATCHER: CODE_B, UPTO: CODE_B})
        assert refusal is not None and "genesis" in refusal
    finally:
        first.close()
        second.close()
