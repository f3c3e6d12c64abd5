"""/verify over HTTP with chain-state checks on (the default) and off (stateless, as before).

    python -m benchmarks.verify_http [--requests 2000] [--concurrency 64] [--rounds 3]

One anvil, one set of signed payments (verify stores nothing, so every round reuses them);
each round runs one ``x402-engine serve`` process per variant, alternating which goes first.
Reported per variant: the median over rounds of verifications per second, latency p50/p99,
and JSON-RPC requests per 1,000 verifications (from the service's own /metrics).
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

from engine.config import IngestConfig, ServiceConfig, dump_config
from engine.dev.devchain import Anvil, engine_config, free_port, setup_devchain
from engine.dev.loadgen import payment_v2

from .http_load import post_all, serving

VALUE = 1000
VARIANTS = {"state checks": True, "stateless": False}
WINDOW_MS = [IngestConfig().state_window_ms]


class Round(msgspec.Struct):
    variant: str
    requests: int
    valid: int
    per_s: float
    latency_ms_p50: float
    latency_ms_p99: float
    rpc_per_1000: float
    state_reads_per_1000: float


class Summary(msgspec.Struct):
    variant: str
    rounds: int
    per_s_median: float
    latency_ms_p50_median: float
    latency_ms_p99_median: float
    rpc_per_1000_median: float


def _quantile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _metric_sum(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.split()[-1])
    return total


async def _serve_and_post(
    variant: str, checks: bool, base: Path, env: dict[str, str], bodies: list[bytes], conc: int
) -> Round:
    from engine.config import load_config

    config = load_config(base)
    port = free_port()
    config = msgspec.structs.replace(
        config,
        service=ServiceConfig(port=port),
        ingest=IngestConfig(state_checks=checks, state_window_ms=WINDOW_MS[0]),
    )
    async with (
        serving(config, env, base.parent, variant.replace(" ", "-")) as url,
        httpx.AsyncClient(timeout=10) as client,
    ):
        before = (await client.get(url + "/metrics")).text
        start = time.perf_counter()
        answers = await post_all(url, "/verify", bodies, concurrency=conc)
        wall = time.perf_counter() - start
        after = (await client.get(url + "/metrics")).text
    docs = [msgspec.json.decode(a.body) for a in answers]
    lat = sorted(a.latency_s * 1000 for a in answers)
    rpc = _metric_sum(after, "x402_rpc_requests_total") - _metric_sum(
        before, "x402_rpc_requests_total"
    )
    reads = _metric_sum(after, "x402_state_reads_total") - _metric_sum(
        before, "x402_state_reads_total"
    )
    return Round(
        variant=variant,
        requests=len(bodies),
        valid=sum(1 for d in docs if d.get("isValid")),
        per_s=len(bodies) / wall,
        latency_ms_p50=statistics.median(lat),
        latency_ms_p99=_quantile(lat, 0.99),
        rpc_per_1000=1000 * rpc / len(bodies),
        state_reads_per_1000=1000 * reads / len(bodies),
    )


async def run(requests: int, concurrency: int, rounds: int) -> tuple[list[Round], list[Summary]]:
    workdir = Path(tempfile.mkdtemp(prefix="x402-verify-bench-"))
    payers = min(requests, 500)
    with Anvil() as anvil:
        dev = await setup_devchain(anvil.url, payers=payers, payer_balance=100 * VALUE)
        config, env = engine_config(dev, str(workdir / "ledger.duckdb"))
        base = workdir / "engine.toml"
        base.write_bytes(dump_config(config))
        keys = dev.payer_key_bytes()
        payee = bytes.fromhex(dev.payee[2:])
        now = int(time.time())
        bodies = [
            msgspec.json.encode({"x402Version": 2, "paymentPayload": p, "paymentRequirements": r})
            for p, r in (
                payment_v2(dev.domain, keys[i % payers], payee, VALUE, now) for i in range(requests)
            )
        ]
        results: list[Round] = []
        for r in range(rounds):
            order = list(VARIANTS.items())
            if r % 2:
                order.reverse()
            for variant, checks in order:
                result = await _serve_and_post(variant, checks, base, env, bodies, concurrency)
                results.append(result)
                print(
                    f"round {r + 1} {variant:>12}: {result.valid}/{result.requests} valid,"
                    f" {result.per_s:,.0f}/s, p50 {result.latency_ms_p50:.1f} ms,"
                    f" p99 {result.latency_ms_p99:.1f} ms, {result.rpc_per_1000:.1f} RPC"
                    f" requests per 1,000",
                    flush=True,
                )
    summaries = []
    for variant in VARIANTS:
        mine = [x for x in results if x.variant == variant]
        summaries.append(
            Summary(
                variant=variant,
                rounds=len(mine),
                per_s_median=statistics.median(x.per_s for x in mine),
                latency_ms_p50_median=statistics.median(x.latency_ms_p50 for x in mine),
                latency_ms_p99_median=statistics.median(x.latency_ms_p99 for x in mine),
                rpc_per_1000_median=statistics.median(x.rpc_per_1000 for x in mine),
            )
        )
    on, off = summaries
    print(
        f"medians over {rounds} rounds: state checks {on.per_s_median:,.0f}/s"
        f" (p99 {on.latency_ms_p99_median:.1f} ms, {on.rpc_per_1000_median:.1f} RPC per 1,000)"
        f" vs stateless {off.per_s_median:,.0f}/s (p99 {off.latency_ms_p99_median:.1f} ms):"
        f" {on.per_s_median / off.per_s_median:.2f}x throughput",
        flush=True,
    )
    return results, summaries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--window-ms", type=float, default=WINDOW_MS[0], help="ingest.state_window_ms"
    )
    parser.add_argument("--json", default="bench-results/verify_http.json")
    args = parser.parse_args()
    WINDOW_MS[0] = args.window_ms
    results, summaries = trio.run(run, args.requests, args.concurrency, args.rounds)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(
        msgspec.json.format(msgspec.json.encode({"rounds": results, "medians": summaries}))
    )


if __name__ == "__main__":
    main()
