"""Verify worker processes: the same answers as the in-process checks, batched, on other cores."""

from __future__ import annotations

import time
from pathlib import Path

import msgspec
import pytest
import trio

from engine.clock import SystemClock
from engine.config import EngineConfig
from engine.dev.devchain import Anvil, engine_config, setup_devchain
from engine.dev.loadgen import TokenDomain, payment_v1, payment_v2, to_json
from engine.engine import Engine
from engine.model import Accepted, Rejected
from engine.rules import reasons
from engine.stages.verify import Verifier
from engine.stages.verify_pool import VerifyPool

from .conftest import PAYEE


async def test_workers_answer_exactly_as_the_in_process_verifier(
    offline_config: EngineConfig, domain: TokenDomain, payer_key: bytes, now: int
) -> None:
    good2 = payment_v2(domain, payer_key, PAYEE, 1000, now)
    good1 = payment_v1(domain, payer_key, PAYEE, 7, now, "base")
    bad_sig = msgspec.json.decode(to_json(good2[0]))
    bad_sig["payload"]["signature"] = "0x" + "11" * 65
    wrong_to = msgspec.json.decode(to_json(good2[0]))
    wrong_to["payload"]["authorization"]["to"] = "0x" + "44" * 20
    cases: list[tuple[object, object]] = [
        good2,
        (to_json(good1[0]), to_json(good1[1])),
        (bad_sig, good2[1]),
        (wrong_to, good2[1]),
        (b"not json", b"{}"),
        (msgspec.to_builtins(good2[0]), msgspec.to_builtins(good2[1])),
    ]
    verifier = Verifier(offline_config)
    pool = VerifyPool(offline_config, SystemClock(), workers=2, batch_max=2)
    answers: dict[int, object] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)

        async def one(i: int, payload: object, req: object) -> None:
            answers[i] = await pool.check(payload, req)

        for i, (payload, req) in enumerate(cases * 20):
            nursery.start_soon(one, i, payload, req)
        with trio.fail_after(30):
            while len(answers) < len(cases) * 20:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert pool.items_sent == len(cases) * 20
    assert pool.batches_sent >= len(cases) * 10  # batch_max=2: batched, never more than 2
    for i, (payload, req) in enumerate(cases * 20):
        expected = verifier.check(payload, req, now)
        got = answers[i]
        assert got == expected, (i, got, expected)
    reasons_seen = set()
    for answer in answers.values():
        assert isinstance(answer, tuple)
        if isinstance(answer[1], Rejected):
            reasons_seen.add(answer[1].reason)
    # a 65-byte signature that does not recover is left to the chain (EIP-1271), by workers too
    expected_reasons = {reasons.CONTRACT_SIGNATURE, reasons.RECIPIENT_MISMATCH}
    assert reasons_seen == expected_reasons | {reasons.INVALID_PAYLOAD}


async def test_a_dead_worker_fails_its_callers_instead_of_hanging(
    offline_config: EngineConfig, domain: TokenDomain, payer_key: bytes, now: int
) -> None:
    pool = VerifyPool(offline_config, SystemClock(), workers=1)
    payload, req = payment_v2(domain, payer_key, PAYEE, 1000, now)
    with pytest.raises(BaseException) as caught:  # the nursery groups the errors
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run)
            assert (await pool.check(payload, req))[0] is not None
            pool._workers[0].process.kill()
            with trio.fail_after(10):
                await pool.check(payload, req)
    assert "verify worker" in repr(caught.value)


@pytest.mark.chain
async def test_engine_with_verify_workers_accepts_dedups_and_settles(
    anvil: Anvil, tmp_path: Path
) -> None:
    dev = await setup_devchain(anvil.url, payers=20)
    config, env = engine_config(dev, str(tmp_path / "l.duckdb"))
    config = msgspec.structs.replace(
        config, ingest=msgspec.structs.replace(config.ingest, verify_workers=2)
    )
    payee = bytes.fromhex(dev.payee[2:])
    now = int(time.time())
    work = [payment_v2(dev.domain, k, payee, 1000, now) for k in dev.payer_key_bytes()]
    async with Engine.open(config, environ=env) as engine:
        results: list[object] = []

        async def submit(payload: object, req: object) -> None:
            results.append(await engine.submit(payload, req))

        async with trio.open_nursery() as nursery:
            for payload, req in work + work[:5]:  # five replays
                nursery.start_soon(submit, payload, req)
        accepted = [r for r in results if isinstance(r, Accepted)]
        assert len(accepted) == 25
        assert sum(r.duplicate for r in accepted) == 5
        assert len({r.id for r in accepted}) == 20
        forged = msgspec.json.decode(to_json(work[0][0]))
        forged["payload"]["authorization"]["value"] = "1001"
        forged_req = msgspec.json.decode(to_json(work[0][1]))
        forged_req["amount"] = "1001"
        refused = await engine.submit(forged, forged_req)
        assert isinstance(refused, Rejected) and refused.reason == reasons.SIGNATURE
        await engine.drain(timeout_s=60)
        assert engine.statistics().settled == 20
