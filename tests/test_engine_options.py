"""Engine options on a real anvil: confirmations, gas-cap splitting, several signers, the
thread-safe handle, the demo."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from pathlib import Path

import pytest
import trio

from engine import EngineHandle
from engine.chain.rpc import Rpc
from engine.config import PolicyConfig
from engine.dev.demo import run_demo
from engine.dev.devchain import Anvil, engine_config, new_key, setup_devchain
from engine.dev.loadgen import payment_v2
from engine.engine import Engine
from engine.model import Accepted

from .chain import balances

pytestmark = pytest.mark.chain
VALUE = 1000


async def test_outcome_waits_for_the_configured_confirmations(anvil: Anvil, tmp_path: Path) -> None:
    dev = await setup_devchain(anvil.url, payers=1)
    config, env = engine_config(dev, str(tmp_path / "l.duckdb"), confirmations=3)
    rpc = Rpc(anvil.url)
    payload, req = payment_v2(
        dev.domain, dev.payer_key_bytes()[0], bytes.fromhex(dev.payee[2:]), VALUE, int(time.time())
    )
    async with Engine.open(config, environ=env) as engine:
        result = await engine.submit(payload, req)
        assert isinstance(result, Accepted)
        await engine.until(lambda s: s.batches_sent > 0, timeout_s=20)
        sent = await engine.status(result.id)
        assert sent is not None and sent.tx_hash is not None
        with trio.fail_after(20):  # mined (automine): 1 confirmation
            while (await rpc.receipts([sent.tx_hash]))[0] is None:
                await trio.sleep(0.05)
        # two polls of the confirm stage that saw the receipt: still not final with 3 needed
        polls = engine.settlement_statistics()[dev.chain_id].receipt_polls
        with trio.fail_after(20):
            while engine.settlement_statistics()[dev.chain_id].receipt_polls < polls + 2:
                await trio.sleep(0.05)
        status = await engine.status(result.id)
        assert status is not None and status.state == "submitted"
        await rpc.call("evm_mine", [])
        await rpc.call("evm_mine", [])
        outcome = await engine.wait(result.id, timeout_s=20)
        assert outcome.state == "settled" and outcome.block_number is not None
        head = int(await rpc.call("eth_blockNumber"), 16)
        assert head - outcome.block_number + 1 >= 3
    await rpc.aclose()


@pytest.mark.parametrize("mode", ["compact", "aggregate3"])
async def test_batch_over_the_gas_cap_is_split_and_several_signers_share_the_load(
    anvil: Anvil, tmp_path: Path, mode: str
) -> None:
    dev = await setup_devchain(anvil.url, payers=60, signers=2)
    # The planning figure is far too low, so the planner packs 60 items; the simulation's
    # gas (compact) or the per-item bound (aggregate3) then shows the batch above the 1M cap
    # and the submit stage splits it.
    config, env = engine_config(
        dev,
        str(tmp_path / "l.duckdb"),
        mode=mode,
        policy=PolicyConfig(max_batch_size=60, max_wait_ms=300),
        gas_per_tx_max=1_000_000,
        gas_per_item_estimate=10_000,
    )
    payee = bytes.fromhex(dev.payee[2:])
    now = int(time.time())
    rpc = Rpc(anvil.url)
    before = (await balances(rpc, dev.token, [dev.payee]))[0]
    async with Engine.open(config, environ=env) as engine:
        for key in dev.payer_key_bytes():
            assert isinstance(
                await engine.submit(*payment_v2(dev.domain, key, payee, VALUE, now)),
                Accepted,
            )
        await engine.drain(timeout_s=60)
        stats = engine.statistics()
        rows = await engine.query(
            "SELECT b.signer, b.gas_limit, e.gas_used FROM batches b JOIN batch_events e"
            " ON e.batch_id = b.id WHERE e.state = 'mined'"
        )
    assert stats.settled == 60 and stats.batches_mined >= (3 if mode == "compact" else 9)
    assert all(gas_limit <= 1_000_000 and gas_used <= gas_limit for _, gas_limit, gas_used in rows)
    assert len({signer for signer, _, _ in rows}) == 2
    assert (await balances(rpc, dev.token, [dev.payee]))[0] - before == 60 * VALUE
    await rpc.aclose()


async def test_thread_safe_handle_serves_threads_and_asyncio(anvil: Anvil, tmp_path: Path) -> None:
    dev = await setup_devchain(anvil.url, payers=21)
    config, env = engine_config(dev, str(tmp_path / "l.duckdb"))
    payee = bytes.fromhex(dev.payee[2:])
    now = int(time.time())
    work = [payment_v2(dev.domain, k, payee, VALUE, now) for k in dev.payer_key_bytes()]
    extra = work.pop()

    def host() -> list[str]:
        with EngineHandle(config, environ=env) as handle:
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                results = list(pool.map(lambda w: handle.submit(*w), work[:10]))

            async def asyncio_host() -> list[object]:
                loop = asyncio.get_running_loop()
                return list(
                    await asyncio.gather(
                        *(loop.run_in_executor(None, handle.submit, *w) for w in work[10:])
                    )
                )

            results += asyncio.run(asyncio_host())  # type: ignore[arg-type]
            replays = handle.submit_many(work[:3])  # identical payloads: the same ids
            assert [r.id for r in replays if isinstance(r, Accepted) and r.duplicate] == [
                r.id for r in results[:3] if isinstance(r, Accepted)
            ]
            ids = [r.id for r in results if isinstance(r, Accepted)]
            assert len(ids) == 20
            states = [handle.wait(i, timeout_s=30).state for i in ids]
            assert handle.statistics().settled == 20
            # the facilitator's two calls, from a plain thread
            assert handle.verify(*extra)[1] is None
            sold = handle.settle(*extra)
            assert sold.success and sold.transaction.startswith("0x"), sold
            again = handle.settle(*extra)
            assert not again.success and again.reason == "duplicate_settlement"
            return states

    states = await trio.to_thread.run_sync(host)
    assert states == ["settled"] * 20


async def test_demo_settles_everything_it_accepts(tmp_path: Path) -> None:
    # A fifth of the payers approve Permit2 and pay through it (60 of the 300 payments).
    result = await run_demo(
        payments=300,
        payers=50,
        block_time_s=0,
        concurrency=16,
        ledger_dir=tmp_path,
        permit2_share=0.2,
    )
    assert result.accepted == 300 and result.settled == 300 and result.failed == {}
    assert result.payee_received == result.payee_expected == 300 * 1000
    assert result.batches >= 1 and 30_000 < result.gas_per_payment < 60_000


async def test_batch_of_one_is_sent_directly_to_the_token(anvil: Anvil, tmp_path: Path) -> None:
    dev = await setup_devchain(anvil.url, payers=1)
    config, env = engine_config(dev, str(tmp_path / "l.duckdb"), simulate=False)
    payee = bytes.fromhex(dev.payee[2:])
    now = int(time.time())
    good = payment_v2(dev.domain, dev.payer_key_bytes()[0], payee, VALUE, now)
    broke = payment_v2(dev.domain, new_key(), payee, VALUE, now)  # holds no tokens
    async with Engine.open(config, environ=env) as engine:
        ok = await engine.submit(*good)
        assert isinstance(ok, Accepted)
        settled = await engine.wait(ok.id, timeout_s=30)
        bad = await engine.submit(*broke)
        assert isinstance(bad, Accepted)
        failed = await engine.wait(bad.id, timeout_s=30)
        modes = await engine.query("SELECT mode FROM batches")
    assert settled.state == "settled" and settled.gas_used is not None
    assert settled.gas_used < 70_000  # a compact batch of one costs ~71.6k
    assert modes == [("direct",)]
    assert failed.state == "failed" and failed.reason == "insufficient_funds"


async def test_reverted_batch_is_requeued_and_settles_in_a_later_batch(
    anvil: Anvil, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import engine.stages.submit as submit_module

    dev = await setup_devchain(anvil.url, payers=10)
    config, env = engine_config(
        dev, str(tmp_path / "l.duckdb"), policy=PolicyConfig(max_batch_size=10, max_wait_ms=100)
    )
    payee = bytes.fromhex(dev.payee[2:])
    now = int(time.time())
    # Size the first batch far too small: the batcher's out-of-gas guard reverts it whole.
    monkeypatch.setattr(submit_module, "SETTLE_OVERHEAD_GAS", -250_000)
    async with Engine.open(config, environ=env) as engine:
        ids = []
        for key in dev.payer_key_bytes():
            result = await engine.submit(*payment_v2(dev.domain, key, payee, VALUE, now))
            assert isinstance(result, Accepted)
            ids.append(result.id)
        await engine.until(lambda s: s.requeued >= 10, timeout_s=30)
        monkeypatch.setattr(submit_module, "SETTLE_OVERHEAD_GAS", 30_000)
        outcomes = [await engine.wait(i, timeout_s=30) for i in ids]
        history = await engine.history(ids[0])
        batch_states = await engine.query("SELECT state FROM batch_events ORDER BY seq")
    assert [o.state for o in outcomes] == ["settled"] * 10
    assert [h["state"] for h in history][:3] == ["submitted", "accepted", "submitted"]
    assert ("reverted",) in batch_states and batch_states[-1] == ("mined",)
