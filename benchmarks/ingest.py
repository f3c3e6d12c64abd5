"""Ingest: verified, deduplicated, durably recorded payments per second through the public API
(``Engine.submit``), acknowledgement latency at several offered loads, and the references
measured on the same payloads and cores: bare secp256k1 recovery (one core and all cores) and
the official x402 SDK's verify.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import coincurve
import msgspec
import trio

from engine import crypto
from engine.devchain import DevChain, engine_config
from engine.engine import Engine
from engine.gctune import tuned_gc
from engine.policy import Limits, PoolView
from engine.verify import Verifier


class HoldPolicy:
    """Never flushes on its own: isolates ingest from settlement (deadlines still apply, and
    the workload's are days away)."""

    def due(self, view: PoolView, limits: Limits, now: float) -> bool:
        return False

    def wake_at(self, view: PoolView, limits: Limits, now: float) -> float | None:
        return None


def percentiles(values_s: list[float]) -> dict[str, float]:
    if not values_s:
        return {"p50_ms": math.nan, "p99_ms": math.nan, "p999_ms": math.nan, "max_ms": math.nan}
    ordered = sorted(values_s)

    def q(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000

    return {
        "p50_ms": statistics.median(ordered) * 1000,
        "p99_ms": q(0.99),
        "p999_ms": q(0.999),
        "max_ms": ordered[-1] * 1000,
    }


# ----------------------------------------------------------------- references


def _recovery_inputs(dev: DevChain, bodies: list[bytes]) -> list[tuple[bytes, bytes]]:
    config, _ = engine_config(dev, ":memory:")
    verifier = Verifier(config)
    out: list[tuple[bytes, bytes]] = []
    sep = dev.domain.separator
    for body in bodies:
        doc = msgspec.json.decode(body)
        payment, _ = verifier.check(doc["paymentPayload"], doc["paymentRequirements"], time.time())
        assert payment is not None
        digest = crypto.transfer_digest(
            sep,
            payment.payer,
            payment.payee,
            payment.value,
            payment.valid_after,
            payment.valid_before,
            payment.nonce,
        )
        out.append((digest, payment.signature[:64] + bytes([payment.signature[64] - 27])))
    return out


def _recover_all(inputs: list[tuple[bytes, bytes]]) -> float:
    start = time.perf_counter()
    for digest, sig in inputs:
        coincurve.PublicKey.from_signature_and_message(sig, digest, hasher=None)
    return time.perf_counter() - start


def bare_recovery_rates(dev: DevChain, bodies: list[bytes]) -> dict[str, float]:
    """Public-key recovery alone: one core, and one process per core in parallel."""
    inputs = _recovery_inputs(dev, bodies)
    one_core = len(inputs) / _recover_all(inputs)
    cores = os.cpu_count() or 1
    chunk = math.ceil(len(inputs) / cores)
    parts = [inputs[i : i + chunk] for i in range(0, len(inputs), chunk)]
    # fork: call this before trio, threads or DuckDB exist in the process.
    with multiprocessing.get_context("fork").Pool(cores) as pool:
        pool.map(_recover_all, [parts[0][:10]] * cores)  # warm up the workers
        start = time.perf_counter()
        pool.map(_recover_all, parts)
        all_cores = len(inputs) / (time.perf_counter() - start)
    return {"one_core_per_s": one_core, "all_cores_per_s": all_cores, "cores": cores}


# ----------------------------------------------------------------- the engine


async def _submit_closed_loop(
    engine: Engine, bodies: list[bytes], concurrency: int
) -> tuple[float, list[float], list[float]]:
    """All bodies through ``submit`` with ``concurrency`` callers; (seconds, latencies,
    completion times relative to the start)."""
    latencies: list[float] = []
    completions: list[float] = []
    it = iter(bodies)
    start = time.perf_counter()

    async def caller() -> None:
        for body in it:
            doc = msgspec.json.decode(body, type=_Envelope)
            t0 = time.perf_counter()
            result = await engine.submit(doc.paymentPayload, doc.paymentRequirements)
            t1 = time.perf_counter()
            assert getattr(result, "id", None) is not None, result
            latencies.append(t1 - t0)
            completions.append(t1 - start)

    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(caller)
    return time.perf_counter() - start, latencies, completions


class _Envelope(msgspec.Struct):
    paymentPayload: msgspec.Raw
    paymentRequirements: msgspec.Raw


async def _submit_open_loop(engine: Engine, bodies: list[bytes], rate_per_s: float) -> list[float]:
    """Offer payments at a fixed rate regardless of answers; latency counts from the moment each
    payment was due (so queueing shows)."""
    envelopes = [msgspec.json.decode(b, type=_Envelope) for b in bodies]
    latencies: list[float] = []
    start = trio.current_time()

    async def one(doc: _Envelope, due: float) -> None:
        await engine.submit(doc.paymentPayload, doc.paymentRequirements)
        latencies.append(trio.current_time() - due)

    async with trio.open_nursery() as nursery:
        for i, doc in enumerate(envelopes):
            due = start + i / rate_per_s
            await trio.sleep_until(due)
            nursery.start_soon(one, doc, due)
    return latencies


async def measure_engine_ingest(
    dev: DevChain,
    bodies: list[bytes],
    *,
    loads: tuple[float, ...] = (0.25, 0.5, 0.75),
    concurrency: int = 256,
    open_loop_s: float = 4.0,
) -> dict[str, Any]:
    """Maximum ingest rate (closed loop), then latency at fractions of it (open loop), each on a
    fresh ledger file and fresh payments."""
    workdir = Path(tempfile.mkdtemp(prefix="x402-bench-ingest-"))
    config, env = engine_config(dev, str(workdir / "max.duckdb"))
    # Warm-up on a slice the measurement does not reuse.
    warm, rest = bodies[:2000], bodies[2000:]
    n_max = min(len(rest) // 2, max(20_000, len(rest) // 2))
    closed, open_pool = rest[:n_max], rest[n_max:]
    async with Engine.open(config, environ=env, policy=lambda _c: HoldPolicy()) as engine:
        with tuned_gc():  # as `x402-engine serve` does
            await _submit_closed_loop(engine, warm, concurrency)
            seconds, latencies, completions = await _submit_closed_loop(engine, closed, concurrency)
    max_rate = len(closed) / seconds
    result: dict[str, Any] = {
        "payments": len(closed),
        "concurrency": concurrency,
        "max_rate_per_s": max_rate,
        "closed_loop_latency": percentiles(latencies),
        "completions_s": completions,
        "offered": [],
    }
    used = 0
    for fraction in loads:
        rate = max_rate * fraction
        n = min(int(rate * open_loop_s), len(open_pool) - used)
        if n < 100:
            break
        slice_ = open_pool[used : used + n]
        used += n
        config, env = engine_config(dev, str(workdir / f"load-{fraction}.duckdb"))
        async with Engine.open(config, environ=env, policy=lambda _c: HoldPolicy()) as engine:
            with tuned_gc():
                lat = await _submit_open_loop(engine, slice_, rate)
        result["offered"].append(
            {
                "fraction": fraction,
                "rate_per_s": rate,
                "payments": n,
                **percentiles(lat),
                "latencies_s": lat,
            }
        )
    return result
