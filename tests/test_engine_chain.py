"""The engine end to end on a real anvil: batches, balances, failures, replays."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import msgspec
import pytest
import trio

from engine.chain import codec
from engine.chain.rpc import Rpc
from engine.clock import TrioWallClock
from engine.config import PolicyConfig
from engine.dev.devchain import Anvil, Deployer, DevChain, engine_config, new_key, setup_devchain
from engine.dev.loadgen import payment_v1, payment_v2, to_json
from engine.engine import Engine
from engine.model import Accepted, Rejected
from engine.rules import reasons
from engine.stages.verify import Verifier

from .chain import balances, cancel_calldata, count_authorization_used, payer_addresses

pytestmark = pytest.mark.chain
VALUE = 1000


async def test_thousand_payments_from_distinct_payers_settle_in_batches(
    anvil: Anvil, tmp_path: Path
) -> None:
    dev = await setup_devchain(anvil.url, payers=1000, payer_balance=10 * VALUE)
    config, env = engine_config(
        dev, str(tmp_path / "l.duckdb"), policy=PolicyConfig(max_batch_size=300, max_wait_ms=200)
    )
    rpc = Rpc(anvil.url)
    payee_before = (await balances(rpc, dev.token, [dev.payee]))[0]
    now = int(time.time())
    payee = bytes.fromhex(dev.payee[2:])
    work = [payment_v2(dev.domain, k, payee, VALUE, now) for k in dev.payer_key_bytes()]
    async with Engine.open(config, environ=env) as engine:
        ids: list[int] = []

        async def send(chunk: Sequence[tuple[object, object]]) -> None:
            for payload, req in chunk:
                result = await engine.submit(to_json(payload), to_json(req))
                assert isinstance(result, Accepted), result
                ids.append(result.id)

        async with trio.open_nursery() as nursery:
            for i in range(0, len(work), 50):
                nursery.start_soon(send, work[i : i + 50])
        await engine.drain(timeout_s=120)
        stats = engine.statistics()
        outcomes = [await engine.wait(i) for i in ids]
    assert len(set(ids)) == 1000
    assert stats.settled == 1000 and stats.failed == {}
    assert all(o.state == "settled" and o.tx_hash for o in outcomes)
    assert 4 <= stats.batches_mined <= 20, stats  # batched, not one tx per payment
    assert len({o.tx_hash for o in outcomes}) == stats.batches_mined
    assert sum(o.gas_used or 0 for o in outcomes) == stats.gas_used
    after = await balances(rpc, dev.token, [dev.payee, *payer_addresses(dev)])
    assert after[0] - payee_before == 1000 * VALUE
    assert after[1:] == [9 * VALUE] * 1000
    await rpc.aclose()


async def test_replayed_payload_settles_once(anvil: Anvil, tmp_path: Path) -> None:
    dev = await setup_devchain(anvil.url, payers=2)
    config, env = engine_config(dev, str(tmp_path / "l.duckdb"))
    rpc = Rpc(anvil.url)
    payee = bytes.fromhex(dev.payee[2:])
    key = dev.payer_key_bytes()[0]
    now = int(time.time())
    payload, req = payment_v2(dev.domain, key, payee, VALUE, now)
    before = (await balances(rpc, dev.token, [dev.payee]))[0]
    async with Engine.open(config, environ=env) as engine:
        results: list[Accepted | Rejected] = []

        async def submit() -> None:
            results.append(await engine.submit(to_json(payload), to_json(req)))

        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(submit)
        ids = {r.id for r in results if isinstance(r, Accepted)}
        assert len(results) == 10 and len(ids) == 1
        assert sum(1 for r in results if isinstance(r, Accepted) and not r.duplicate) == 1
        (rid,) = ids
        outcome = await engine.wait(rid, timeout_s=60)
        assert outcome.state == "settled", outcome
        again = await engine.submit(payload, req)
        assert isinstance(again, Accepted) and again.id == rid and again.duplicate
        # Same nonce, different authorization (another amount): refused.
        nonce = bytes.fromhex(payload.payload.eip3009.nonce[2:])
        other, other_req = payment_v2(dev.domain, key, payee, VALUE + 1, now, nonce=nonce)
        refused = await engine.submit(other, other_req)
        assert isinstance(refused, Rejected) and refused.reason == reasons.NONCE_USED
        # refused means nothing stored and nothing queued for a batch
        assert await engine.query("SELECT count(*) FROM payments") == [(1,)]
        assert engine.queue_depths() == {dev.chain_id: 0}
    payer = bytes.fromhex(payload.payload.eip3009.from_[2:])
    assert await count_authorization_used(rpc, dev.token, payer, nonce) == 1
    assert (await balances(rpc, dev.token, [dev.payee]))[0] - before == VALUE
    # After a restart the replay is still recognised from the ledger.
    async with Engine.open(config, environ=env) as engine:
        again = await engine.submit(payload, req)
        assert isinstance(again, Accepted) and again.id == rid and again.duplicate
        assert (await engine.status(rid)) is not None
        assert (await engine.wait(rid)).state == "settled"
    await rpc.aclose()


async def _make_failures(
    dev: DevChain, rpc: Rpc, engine_now: int
) -> dict[str, tuple[object, object]]:
    """One payment per failure kind (and a good one), prepared on chain as needed."""
    keys = dev.payer_key_bytes()
    payee = bytes.fromhex(dev.payee[2:])
    domain = dev.domain
    deployer = Deployer(rpc, bytes.fromhex(dev.deployer_key[2:]), dev.chain_id)
    cases: dict[str, tuple[object, object]] = {}
    cases["good"] = payment_v2(domain, keys[0], payee, VALUE, engine_now)
    cases["good_v1"] = payment_v1(domain, keys[0], payee, VALUE, engine_now, "anvil")
    cases[reasons.INSUFFICIENT_FUNDS] = payment_v2(domain, new_key(), payee, VALUE, engine_now)
    verifier = Verifier(engine_config(dev, ":memory:")[0])
    used, used_req = payment_v2(domain, keys[1], payee, VALUE, engine_now)
    payment, rej = verifier.check(used, used_req, engine_now)
    assert payment is not None, rej
    await deployer.send(dev.token, codec.transfer_calldata(payment))  # someone else settles it
    cases["front_run"] = (used, used_req)
    # The payer signed another authorization (another amount) with the same nonce, and it was
    # used on chain: this one can no longer settle, and the payee was not paid by it.
    ours, ours_req = payment_v2(domain, keys[1], payee, VALUE, engine_now)
    nonce = bytes.fromhex(ours.payload.eip3009.nonce[2:])
    rival, rival_req = payment_v2(domain, keys[1], payee, VALUE + 7, engine_now, nonce=nonce)
    rival_payment, rej = verifier.check(rival, rival_req, engine_now)
    assert rival_payment is not None, rej
    await deployer.send(dev.token, codec.transfer_calldata(rival_payment))
    cases[reasons.NONCE_USED] = (ours, ours_req)
    cancelled, cancelled_req = payment_v2(domain, keys[2], payee, VALUE, engine_now)
    nonce = bytes.fromhex(cancelled.payload.eip3009.nonce[2:])
    await deployer.send(dev.token, cancel_calldata(dev, keys[2], nonce))
    cases["cancelled"] = (cancelled, cancelled_req)
    # Valid by the engine's (skewed) clock, already expired by the chain's.
    real_now = int(time.time())
    expired, expired_req = payment_v2(domain, keys[3], payee, VALUE, engine_now, valid_for_s=60)
    assert int(expired.payload.eip3009.valid_before) < real_now
    cases[reasons.VALID_BEFORE] = (expired, expired_req)
    return cases


@pytest.mark.parametrize(
    ("mode", "simulate"),
    [("compact", True), ("compact", False), ("aggregate3", True), ("aggregate3", False)],
)
async def test_failing_items_are_recorded_with_reasons_and_good_ones_settle(
    anvil: Anvil, tmp_path: Path, mode: str, simulate: bool
) -> None:
    dev = await setup_devchain(anvil.url, payers=4)
    rpc = Rpc(anvil.url)
    skew_s = 600
    engine_now = int(time.time()) - skew_s
    cases = await _make_failures(dev, rpc, engine_now)
    config, env = engine_config(
        dev,
        str(tmp_path / "l.duckdb"),
        mode=mode,
        simulate=simulate,
        policy=PolicyConfig(max_batch_size=300, max_wait_ms=300),
    )
    before = (await balances(rpc, dev.token, [dev.payee]))[0]
    async with Engine.open(
        config, environ=env, clock=TrioWallClock(time.time() - skew_s)
    ) as engine:
        ids: dict[str, int] = {}
        for name, (payload, req) in cases.items():
            result = await engine.submit(payload, req)
            assert isinstance(result, Accepted), (name, result)
            ids[name] = result.id
        await engine.drain(timeout_s=60)
        outcomes = {name: await engine.wait(rid) for name, rid in ids.items()}
        stats = engine.statistics()
        history = await engine.history(ids[reasons.INSUFFICIENT_FUNDS])
    assert outcomes["good"].state == "settled" and outcomes["good_v1"].state == "settled"
    # settled by the front-runner's transaction: the payee was paid, by someone else
    front = outcomes["front_run"]
    assert front.state == "settled" and front.message == "settled by another transaction", front
    assert front.tx_hash not in {outcomes["good"].tx_hash}
    expected = {
        reasons.INSUFFICIENT_FUNDS: reasons.INSUFFICIENT_FUNDS,
        reasons.NONCE_USED: reasons.NONCE_USED,
        "cancelled": reasons.NONCE_USED,
        reasons.VALID_BEFORE: reasons.VALID_BEFORE,
    }
    for name, reason in expected.items():
        o = outcomes[name]
        assert o.state == "failed" and o.reason == reason, (name, o)
        assert o.message
    if simulate:
        assert stats.batches_mined == 1 and "simulation" in (outcomes["cancelled"].message or "")
    else:  # the failures happened on chain, inside the one batch, and were read from its logs
        assert stats.batches_mined == 1
        assert len({outcomes[n].tx_hash for n in outcomes if n != "front_run"}) == 1
    assert history[-1]["state"] == "failed"
    # the engine's own two (the front-runner's and the rival transfers came before `before`)
    assert (await balances(rpc, dev.token, [dev.payee]))[0] - before == 2 * VALUE
    await rpc.aclose()


async def test_bad_signature_is_rejected_at_submit_and_frees_the_nonce(
    anvil: Anvil, tmp_path: Path
) -> None:
    dev = await setup_devchain(anvil.url, payers=1)
    config, env = engine_config(dev, str(tmp_path / "l.duckdb"))
    payee = bytes.fromhex(dev.payee[2:])
    key = dev.payer_key_bytes()[0]
    now = int(time.time())
    good, req = payment_v2(dev.domain, key, payee, VALUE, now)
    # Same authorization, signed by someone else: the form is fine, recovery gives another address.
    forged_sig = payment_v2(dev.domain, new_key(), payee, VALUE, now)[0].payload.signature
    forged_auth = msgspec.structs.replace(good.payload, signature=forged_sig)
    forged = msgspec.structs.replace(good, payload=forged_auth)
    async with Engine.open(config, environ=env) as engine:
        results = []

        async def submit(p: object) -> None:
            results.append(await engine.submit(p, req))

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(submit, forged)
        assert all(isinstance(r, Rejected) and r.reason == reasons.SIGNATURE for r in results), (
            results
        )
        assert await engine.query("SELECT count(*) FROM payments") == [(0,)]
        accepted = await engine.submit(good, req)  # the nonce was never taken
        assert isinstance(accepted, Accepted) and not accepted.duplicate
        assert (await engine.wait(accepted.id, timeout_s=30)).state == "settled"
        assert engine.statistics().rejected == {reasons.SIGNATURE: 3}
