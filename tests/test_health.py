"""/healthz says when settlement is stuck, and why: work waits and nothing progresses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import trio

from engine.chain import crypto
from engine.clock import TrioWallClock
from engine.config import ServiceConfig
from engine.dev.loadgen import TokenDomain, payment_v2
from engine.engine import Engine
from engine.model import Accepted
from engine.rules.health import judge_health
from engine.sim import FakeChain, Faults
from engine.sim.campaign import BATCHER, CHAIN_ID, START_UNIX, TOKEN
from engine.sim.campaign import _key as sim_key


def test_judge_health_names_the_stall() -> None:
    common: dict[str, Any] = {"pending": 5, "queued": 3, "slots": 4, "stall_after_s": 60.0}
    assert judge_health(
        now=100, last_progress=0, inflight=0, blocked_since=None, free_slots=4, **common
    ).ok  # nothing waits: payments waiting for a schedule are not a stall
    assert judge_health(
        now=50, last_progress=0, inflight=2, blocked_since=None, free_slots=2, **common
    ).ok  # not long enough
    stuck = judge_health(
        now=100, last_progress=0, inflight=2, blocked_since=None, free_slots=2, **common
    )
    assert not stuck.ok and "2 batches in flight" in stuck.reason and "100 s" in stuck.reason
    leaked = judge_health(
        now=100, last_progress=0, inflight=0, blocked_since=30, free_slots=0, **common
    )
    assert not leaked.ok and "leaked" in leaked.reason and "waiting 70 s" in leaked.reason


async def test_engine_reports_unhealthy_while_the_node_is_away_and_recovers(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    from engine.config import ChainConfig, EngineConfig, LedgerConfig, PolicyConfig, TokenConfig

    clock = TrioWallClock(START_UNIX)
    chain = FakeChain(1, clock, chain_id=CHAIN_ID, token=TOKEN, batcher=BATCHER)
    payer_key = sim_key(1, "payer", 0)
    chain.fund(crypto.private_key_address(payer_key), 10_000)
    env = {"SIM_SIGNER_0": "0x" + sim_key(1, "signer", 0).hex()}
    config = EngineConfig(
        chains=[
            ChainConfig(
                chain_id=CHAIN_ID,
                rpc_url="sim://",
                batcher="0x" + BATCHER.hex(),
                tokens=[TokenConfig(address="0x" + TOKEN.hex(), name="USD Coin", version="2")],
                signer_key_envs=list(env),
            )
        ],
        ledger=LedgerConfig(path=str(tmp_path / "l.duckdb")),
        policy=PolicyConfig(max_wait_ms=100),
        service=ServiceConfig(stall_after_s=60.0),
    )
    domain = TokenDomain(CHAIN_ID, TOKEN, "USD Coin", "2")
    payload, req = payment_v2(domain, payer_key, b"\x22" * 20, 1000, START_UNIX)
    async with Engine.open(
        config, clock=clock, environ=env, chain_client=lambda _c: chain, io_threads=False
    ) as engine:
        assert engine.health().ok
        result = await engine.submit(payload, req)
        assert isinstance(result, Accepted)
        await engine.until(lambda s: s.batches_sent > 0)  # sent; no block mined yet
        chain.faults = Faults(rpc_error=1.0)  # the node stops answering
        await trio.sleep(30)
        assert engine.health().ok  # not yet: 60 s
        await trio.sleep(40)
        health = engine.health()
        assert not health.ok, health
        assert "1 batches in flight" in health.reason and health.pending == 1
        chain.faults = Faults.none()
        chain.mine()
        outcome = await engine.wait(result.id, timeout_s=30)
        assert outcome.state == "settled"
        assert engine.health().ok
    assert msgspec.json.encode(health)  # the facilitator serialises it


def test_healthz_answers_503_with_the_reason() -> None:
    from engine.rules.health import Health
    from engine.service.facilitator import Facilitator

    class Stalled:
        def health(self) -> Health:
            return Health(False, "no batch sent and no payment final for 300 s", 7, 300.0)

    status, body = Facilitator(Stalled(), ServiceConfig()).healthz()  # type: ignore[arg-type]
    assert status == 503
    assert msgspec.json.decode(body) == {
        "status": "stalled",
        "reason": "no batch sent and no payment final for 300 s",
        "pending": 7,
        "sinceProgressS": 300.0,
    }
