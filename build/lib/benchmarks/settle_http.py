"""N concurrent /settle calls through the HTTP facilitator, batched vs one transaction each.

    python -m benchmarks.settle_http [--payments 1000] [--block-time 1] [--json FILE]

Each mode runs on its own fresh anvil (same size, same block time): ``batched`` is the default
configuration in ``confirmed`` mode; ``single`` is the same engine configured to send one
transaction per payment (max_batch_size = 1, as today's public facilitators do), with every
transaction allowed in flight at once so that it is not throttled by our own pipeline.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import msgspec
import trio

from engine.config import PolicyConfig, ServiceConfig
from engine.dev.devchain import Anvil, engine_config, free_port, setup_devchain
from engine.dev.loadgen import payment_v2

from .http_load import post_all, serving

VALUE = 1000


class Run(msgspec.Struct):
    mode: str
    payments: int
    succeeded: int
    transactions: int
    gas_per_payment: float
    latency_ms_p50: float
    latency_ms_p99: float
    latency_ms_max: float
    wall_s: float


def _quantile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


async def run_mode(mode: str, payments: int, block_time_s: float, workdir: Path) -> Run:
    with Anvil(block_time_s=block_time_s) as anvil:
        dev = await setup_devchain(anvil.url, payers=payments, payer_balance=10 * VALUE)
        single = mode == "single"
        config, env = engine_config(
            dev,
            str(workdir / f"{mode}.duckdb"),
            policy=PolicyConfig(max_batch_size=1 if single else 400, max_wait_ms=200),
            max_inflight_batches=payments if single else 8,
            poll_interval_ms=100,
        )
        port = free_port()
        config = msgspec.structs.replace(
            config, service=ServiceConfig(port=port, settle_timeout_s=120)
        )
        payee = bytes.fromhex(dev.payee[2:])
        now = int(time.time())
        bodies = [
            msgspec.json.encode({"x402Version": 2, "paymentPayload": p, "paymentRequirements": r})
            for p, r in (
                payment_v2(dev.domain, k, payee, VALUE, now) for k in dev.payer_key_bytes()
            )
        ]
        # The facilitator runs as its own process (`x402-engine serve`), as in production.
        async with (
            serving(config, env, workdir, mode) as url,
            httpx.AsyncClient(timeout=10) as client,
        ):
            start = time.perf_counter()
            answers = await post_all(url, "/settle", bodies, concurrency=payments)
            wall = time.perf_counter() - start
            metrics = (await client.get(url + "/metrics")).text
    docs = [msgspec.json.decode(a.body) for a in answers]
    gas = _metric(metrics, "x402_gas_used_total")
    txs = {d["transaction"] for d in docs if d.get("success")}
    lat = sorted(a.latency_s * 1000 for a in answers)
    return Run(
        mode=mode,
        payments=payments,
        succeeded=sum(1 for d in docs if d.get("success")),
        transactions=len(txs),
        gas_per_payment=gas / payments,
        latency_ms_p50=statistics.median(lat),
        latency_ms_p99=_quantile(lat, 0.99),
        latency_ms_max=lat[-1],
        wall_s=wall,
    )


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


async def run(payments: int, block_time_s: float) -> list[Run]:
    workdir = Path(tempfile.mkdtemp(prefix="x402-settle-bench-"))
    results = []
    for mode in ("batched", "single"):
        results.append(await run_mode(mode, payments, block_time_s, workdir))
        r = results[-1]
        print(
            f"{r.mode:>8}: {r.succeeded}/{r.payments} settled in {r.transactions} transactions,"
            f" {r.gas_per_payment:,.0f} gas/payment, latency p50 {r.latency_ms_p50:,.0f} ms"
            f" p99 {r.latency_ms_p99:,.0f} ms max {r.latency_ms_max:,.0f} ms,"
            f" wall {r.wall_s:.1f} s",
            flush=True,
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--payments", type=int, default=1000)
    parser.add_argument("--block-time", type=float, default=1.0)
    parser.add_argument("--json", default="bench-results/settle_http.json")
    args = parser.parse_args()
    results = trio.run(run, args.payments, args.block_time)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(msgspec.json.format(msgspec.json.encode(results)))


if __name__ == "__main__":
    main()
