"""Crash safety: SIGKILL the engine after acknowledgements and before confirmation, restart it,
and every acknowledged payment is settled exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest
import trio

from engine.chain.rpc import Rpc
from engine.config import PolicyConfig, dump_config
from engine.dev.devchain import Anvil, engine_config, setup_devchain
from engine.dev.loadgen import payment_v2
from engine.store.ledger import Ledger

from .chain import balances, payer_addresses

pytestmark = pytest.mark.chain
ROOT = Path(__file__).resolve().parent.parent
VALUE = 1000
PAYMENTS = 200


def _child(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.engine_child", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def _read_until(proc: subprocess.Popen[str], marker: str, timeout_s: float) -> list[str]:
    assert proc.stdout is not None
    lines: list[str] = []

    def read() -> list[str]:
        assert proc.stdout is not None
        while True:
            line = proc.stdout.readline()
            if not line:
                raise AssertionError(
                    f"child exited: {proc.wait()} {proc.stderr.read() if proc.stderr else ''}"
                )
            lines.append(line.strip())
            if line.startswith(marker):
                return lines

    with trio.fail_after(timeout_s):
        return await trio.to_thread.run_sync(read, abandon_on_cancel=True)


@pytest.mark.parametrize(
    ("mined_while_down", "mode"),
    [(True, "immediate"), (False, "immediate"), (False, "windowed")],
)
async def test_sigkill_after_ack_then_restart_settles_every_payment_exactly_once(
    anvil: Anvil, tmp_path: Path, mined_while_down: bool, mode: str
) -> None:
    """``windowed``: a deferred sweep (credit control on) is killed half sent."""
    dev = await setup_devchain(anvil.url, payers=PAYMENTS, payer_balance=5 * VALUE)
    config, env = engine_config(
        dev,
        str(tmp_path / "ledger.duckdb"),
        policy=PolicyConfig(
            max_batch_size=40,
            max_wait_ms=100,
            mode=mode,  # type: ignore[arg-type]
            window_s=2,
        ),
        max_inflight_batches=2,
    )
    cfg_path, env_path, work_path = tmp_path / "e.toml", tmp_path / "env.json", tmp_path / "w.json"
    cfg_path.write_bytes(dump_config(config))
    env_path.write_text(json.dumps(env))
    payee = bytes.fromhex(dev.payee[2:])
    now = int(time.time())
    work = [payment_v2(dev.domain, k, payee, VALUE, now) for k in dev.payer_key_bytes()]
    work_path.write_bytes(msgspec.json.encode(work))
    rpc = Rpc(anvil.url)
    before = (await balances(rpc, dev.token, [dev.payee]))[0]
    await rpc.call("evm_setAutomine", [False])  # batches get sent but are not mined

    first = _child([str(cfg_path), str(env_path), str(work_path), "submit"])
    try:
        lines = await _read_until(first, "ACKED", 60)
        acked = {int(line.split()[1]) for line in lines if line.startswith("ACK ")}
        assert len(acked) == PAYMENTS
        with trio.fail_after(30):  # wait until batches sit in the mempool, unconfirmed
            while int((await rpc.call("txpool_status"))["pending"], 16) < 2:
                await trio.sleep(0.05)
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()

    # At the kill: some payments sat in sent-but-unmined batches, the rest only in the ledger.
    ledger = Ledger(tmp_path / "ledger.duckdb")
    recovered = ledger.recover()
    ledger.close()
    states = [op.state for op in recovered.open_payments]
    assert len(states) == PAYMENTS
    assert 0 < states.count("submitted") < PAYMENTS
    assert len(recovered.open_batches) >= 1
    if mined_while_down:  # the restart must find these receipts
        await rpc.call("evm_mine", [])
    # else: the batches are still pending at restart; it must rebroadcast and wait for them
    second = _child([str(cfg_path), str(env_path), str(work_path), "recover"])
    try:
        await _read_until(second, "RECOVERED", 60)
        await rpc.call("evm_setAutomine", [True])
        with trio.fail_after(120):
            while second.poll() is None:
                await rpc.call("evm_mine", [])
                await trio.sleep(0.2)
        out = second.stdout.read() if second.stdout else ""
        assert second.returncode == 0, (out, second.stderr.read() if second.stderr else "")
    finally:
        if second.poll() is None:
            second.kill()
            second.wait()
    stats = json.loads(out.strip().splitlines()[-1])
    assert stats["pending"] == 0 and stats["failed"] == {}

    after = await balances(rpc, dev.token, [dev.payee, *payer_addresses(dev)])
    assert after[0] - before == PAYMENTS * VALUE  # the payee got each payment once
    assert after[1:] == [4 * VALUE] * PAYMENTS  # each payer paid exactly once
    ledger = Ledger(tmp_path / "ledger.duckdb")
    rows = ledger.query(
        "SELECT payment_id, count(*) FILTER (WHERE state = 'settled'),"
        " count(*) FILTER (WHERE state = 'failed') FROM payment_events GROUP BY payment_id"
    )
    assert {r[0] for r in rows} == acked
    assert all(r[1] == 1 and r[2] == 0 for r in rows), rows
    ledger.close()
    await rpc.aclose()
