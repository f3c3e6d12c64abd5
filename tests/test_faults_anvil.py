"""Faults against a real anvil: a send that lands but answers an error while the nonce read
fails too (the orphaned batch), a reorganisation of the block holding a batch, and a base fee
that rises past a sent batch's fee cap."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio

from engine.chain.rpc import Rpc
from engine.dev.devchain import Anvil, engine_config, setup_devchain
from engine.dev.loadgen import payment_v2
from engine.engine import Engine
from engine.model import Accepted

from .chain import balances, count_authorization_used
from .rpc_proxy import RpcProxy

pytestmark = pytest.mark.chain
VALUE = 1000


async def test_send_that_lands_but_errors_with_the_nonce_unreadable_still_settles(
    anvil: Anvil, tmp_path: Path
) -> None:
    dev = await setup_devchain(anvil.url, payers=3)
    proxy = RpcProxy(anvil.url)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(proxy.run)
        config, env = engine_config(
            dev,
            str(tmp_path / "l.duckdb"),
            rpc_url=url,
            rpc_retries_max=0,
            max_inflight_batches=1,  # one leaked slot would stall everything after it
        )
        payee = bytes.fromhex(dev.payee[2:])
        now = int(time.time())
        work = [payment_v2(dev.domain, k, payee, VALUE, now) for k in dev.payer_key_bytes()]
        rpc = Rpc(anvil.url)
        before = (await balances(rpc, dev.token, [dev.payee]))[0]
        async with Engine.open(config, environ=env) as engine:
            proxy.inject("eth_sendRawTransaction", "forward-then-error")
            proxy.inject("eth_getTransactionCount", "error", "error")
            first = await engine.submit(*work[0])
            assert isinstance(first, Accepted)
            outcome = await engine.wait(first.id, timeout_s=30)
            assert outcome.state == "settled", outcome
            assert ("eth_sendRawTransaction", "forward-then-error") in proxy.seen
            # the slot came back: the next payments settle too
            rest = [await engine.submit(*w) for w in work[1:]]
            ids = [r.id for r in rest if isinstance(r, Accepted)]
            assert [(await engine.wait(i, timeout_s=30)).state for i in ids] == ["settled"] * 2
            stats = engine.settlement_statistics()[dev.chain_id]
            assert stats.free_slots == stats.slots == 1 and stats.inflight == 0
            failed = await engine.query(
                "SELECT count(*) FROM payment_events WHERE state = 'failed'"
            )
            assert failed == [(0,)]
        for payload, _ in work:
            auth = payload.payload.eip3009
            payer, nonce = bytes.fromhex(auth.from_[2:]), bytes.fromhex(auth.nonce[2:])
            assert await count_authorization_used(rpc, dev.token, payer, nonce) == 1
        assert (await balances(rpc, dev.token, [dev.payee]))[0] - before == 3 * VALUE
        await rpc.aclose()
        nursery.cancel_scope.cancel()


async def _mine_until_final(rpc: Rpc, engine: Engine, rid: int) -> None:
    with trio.fail_after(60):
        while not (outcome := await engine.status(rid)) or not outcome.final:
            await rpc.call("evm_mine", [])
            await trio.sleep(0.2)


async def test_batch_whose_block_is_reorganised_away_settles_once_on_the_canonical_chain(
    anvil: Anvil, tmp_path: Path
) -> None:
    dev = await setup_devchain(anvil.url, payers=1)
    config, env = engine_config(dev, str(tmp_path / "l.duckdb"), confirmations=3)
    rpc = Rpc(anvil.url)
    payload, req = payment_v2(
        dev.domain, dev.payer_key_bytes()[0], bytes.fromhex(dev.payee[2:]), VALUE, int(time.time())
    )
    auth = payload.payload.eip3009
    payer, nonce = bytes.fromhex(auth.from_[2:]), bytes.fromhex(auth.nonce[2:])
    before = (await balances(rpc, dev.token, [dev.payee]))[0]
    async with Engine.open(config, environ=env) as engine:
        result = await engine.submit(payload, req)
        assert isinstance(result, Accepted)
        with trio.fail_after(30):  # mined (automine), not yet final with 3 confirmations
            while not (sent := await engine.status(result.id)) or not sent.tx_hash:
                await trio.sleep(0.05)
            while (first := (await rpc.receipts([sent.tx_hash]))[0]) is None:
                await trio.sleep(0.05)
        await rpc.call("anvil_reorg", [1, []])  # that block is replaced by an empty one
        assert await rpc.block_hash(int(first.block_number, 16)) != first.block_hash
        await _mine_until_final(rpc, engine, result.id)
        outcome = await engine.status(result.id)
        assert outcome is not None and outcome.state == "settled", outcome
        receipt = (await rpc.receipts([outcome.tx_hash or ""]))[0]
        assert receipt is not None and outcome.block_number is not None
        assert await rpc.block_hash(outcome.block_number) == receipt.block_hash  # canonical
        assert receipt.block_hash != first.block_hash  # mined again, in another block
    assert await count_authorization_used(rpc, dev.token, payer, nonce) == 1
    assert (await balances(rpc, dev.token, [dev.payee]))[0] - before == VALUE
    await rpc.aclose()


async def test_batch_stuck_under_a_risen_base_fee_is_replaced_and_settles(
    anvil: Anvil, tmp_path: Path
) -> None:
    dev = await setup_devchain(anvil.url, payers=1)
    config, env = engine_config(dev, str(tmp_path / "l.duckdb"), rebroadcast_after_s=1.0)
    rpc = Rpc(anvil.url)
    payload, req = payment_v2(
        dev.domain, dev.payer_key_bytes()[0], bytes.fromhex(dev.payee[2:]), VALUE, int(time.time())
    )
    await rpc.call("evm_setAutomine", [False])
    async with Engine.open(config, environ=env) as engine:
        result = await engine.submit(payload, req)
        assert isinstance(result, Accepted)
        await engine.until(lambda s: s.batches_sent > 0, timeout_s=30)
        first = await engine.status(result.id)
        assert first is not None and first.tx_hash is not None
        # the base fee jumps far above what the batch offered (twice the base fee at signing)
        await rpc.call("anvil_setNextBlockBaseFeePerGas", [hex(50 * 10**9)])
        await rpc.call("evm_mine", [])
        with trio.fail_after(30):
            while engine.settlement_statistics()[dev.chain_id].replacements == 0:
                await trio.sleep(0.1)
        await _mine_until_final(rpc, engine, result.id)
        outcome = await engine.status(result.id)
        assert outcome is not None and outcome.state == "settled", outcome
        assert outcome.tx_hash != first.tx_hash  # mined under the replacement's hash
        sent = await engine.query("SELECT count(*) FROM batch_transactions")
        assert sent[0][0] >= 1
    await rpc.aclose()
