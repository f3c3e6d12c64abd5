"""Settlement on anvil: one transaction per payment, aggregate3 batches and the compact entry
point, each on a fresh chain of the same size (anvil slows as its state grows)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import trio

from engine.config import PolicyConfig
from engine.dev.devchain import Anvil, setup_devchain
from engine.dev.devchain import engine_config as make_config
from engine.engine import Engine

from .ingest import percentiles
from .workload import BENCH_SEED, cached_workload

MODES = ("single", "aggregate3", "compact")


class _Envelope(msgspec.Struct):
    paymentPayload: msgspec.Raw
    paymentRequirements: msgspec.Raw


async def run_mode(mode: str, payments: int, payers: int, block_time_s: float) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"x402-bench-settle-{mode}-"))
    with Anvil(block_time_s=block_time_s) as anvil:
        dev = await setup_devchain(anvil.url, payers=payers, seed=BENCH_SEED)
        bodies = cached_workload(dev, payments)
        single = mode == "single"
        config, env = make_config(
            dev,
            str(workdir / "ledger.duckdb"),
            mode="aggregate3" if mode == "aggregate3" else "compact",
            policy=PolicyConfig(max_batch_size=1 if single else 400, max_wait_ms=200),
            max_inflight_batches=payments if single else 8,
            poll_interval_ms=100,
        )
        envelopes = [msgspec.json.decode(b, type=_Envelope) for b in bodies]
        async with Engine.open(config, environ=env) as engine:
            start = time.time()
            it = iter(envelopes)

            async def caller() -> None:
                for doc in it:
                    await engine.submit(doc.paymentPayload, doc.paymentRequirements)

            async with trio.open_nursery() as nursery:
                for _ in range(128):
                    nursery.start_soon(caller)
            ingest_s = time.time() - start
            await engine.drain(timeout_s=1800)
            elapsed = time.time() - start
            stats = engine.statistics()
            rows = await engine.query(
                "SELECT p.accepted_at_ms, e.at_ms FROM payments p JOIN payment_events e"
                " ON e.payment_id = p.id AND e.state = 'settled'"
            )
            batch_rows = await engine.query(
                "SELECT count(*), coalesce(sum(octet_length(raw_tx)), 0) FROM batches"
            )
    latencies = [(done - accepted) / 1000 for accepted, done in rows]
    settled_at = sorted((done / 1000) - start for _, done in rows)
    txs, raw_bytes = batch_rows[0]
    return {
        "mode": mode,
        "payments": payments,
        "settled": stats.settled,
        "failed": stats.failed,
        "transactions": int(txs),
        "elapsed_s": elapsed,
        "ingest_s": ingest_s,
        "settled_per_s": stats.settled / elapsed if elapsed else 0.0,
        "gas_per_payment": stats.gas_used / max(1, stats.items_in_mined_batches),
        "tx_bytes_per_payment": int(raw_bytes) / max(1, stats.settled),
        "latency": percentiles(latencies),
        "latencies_s": latencies,
        "settled_at_s": settled_at,
    }


async def measure_settlement(
    payments: int, payers: int, block_time_s: float
) -> list[dict[str, Any]]:
    return [await run_mode(mode, payments, payers, block_time_s) for mode in MODES]
