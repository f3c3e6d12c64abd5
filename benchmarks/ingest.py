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
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import coincurve
import msgspec
import trio

from engine.chain import crypto
from engine.dev.devchain import DevChain, engine_config
from engine.engine import Engine
from engine.gctune import tuned_gc
from engine.rules.policy import Limits, PoolView
from engine.stages.verify import Verifier


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


TICK_S = 0.001  # the open-loop generator releases what is due once per millisecond


async def open_loop(
    count: int, rate_per_s: float, one: Callable[[int, float], Awaitable[None]]
) -> None:
    """Start ``one(i, due)`` for i in 0..count-1 at a fixed rate whatever the answers (a task
    each). The generator wakes once per tick rather than once per item, so that at several
    thousand per second it does not itself eat the core it measures."""
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        i = 0
        while i < count:
            now = trio.current_time()
            while i < count and start + i / rate_per_s <= now:
                nursery.start_soon(one, i, start + i / rate_per_s)
                i += 1
            await trio.sleep_until(now + TICK_S)


async def _submit_open_loop(engine: Engine, bodies: list[bytes], rate_per_s: float) -> list[float]:
    """Offer payments at a fixed rate, one ``submit`` call each; latency counts from the
    moment each payment was due (so queueing and the release tick show)."""
    envelopes = [msgspec.json.decode(b, type=_Envelope) for b in bodies]
    latencies: list[float] = []

    async def one(i: int, due: float) -> None:
        await engine.submit(envelopes[i].paymentPayload, envelopes[i].paymentRequirements)
        latencies.append(trio.current_time() - due)

    await open_loop(len(envelopes), rate_per_s, one)
    return latencies


async def _submit_many_closed_loop(
    engine: Engine, bodies: list[bytes], chunk: int, concurrency: int
) -> tuple[float, list[float], list[float]]:
    """All bodies through ``submit_many`` in chunks, ``concurrency`` chunks at a time."""
    envelopes = [msgspec.json.decode(b, type=_Envelope) for b in bodies]
    chunks = [envelopes[i : i + chunk] for i in range(0, len(envelopes), chunk)]
    it = iter(chunks)
    latencies: list[float] = []
    completions: list[float] = []
    start = time.perf_counter()

    async def caller() -> None:
        for part in it:
            t0 = time.perf_counter()
            results = await engine.submit_many(
                [(e.paymentPayload, e.paymentRequirements) for e in part]
            )
            t1 = time.perf_counter()
            assert all(getattr(r, "id", None) is not None for r in results), results
            latencies.extend([t1 - t0] * len(part))
            completions.extend([t1 - start] * len(part))

    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(caller)
    return time.perf_counter() - start, latencies, completions


class Variant(msgspec.Struct, frozen=True):
    """One way to run ingest: which API, how many verify worker processes."""

    name: str
    api: str  # submit | submit_many
    verify_workers: int

    def cores(self) -> int:
        return (os.cpu_count() or 1) if self.verify_workers else 1


def variants() -> list[Variant]:
    cores = os.cpu_count() or 1
    return [
        Variant("submit, in-process verify", "submit", 0),
        Variant("submit_many, in-process verify", "submit_many", 0),
        Variant(f"submit, {cores} verify workers", "submit", cores),
        Variant(f"submit_many, {cores} verify workers", "submit_many", cores),
    ]


def _config_for(dev: DevChain, path: Path, variant: Variant) -> tuple[Any, dict[str, str]]:
    config, env = engine_config(dev, str(path))
    ingest = msgspec.structs.replace(
        config.ingest, verify_workers=variant.verify_workers, verify_batch_max=64
    )
    return msgspec.structs.replace(config, ingest=ingest), env


async def _max_rate(
    dev: DevChain, workdir: Path, variant: Variant, warm: list[bytes], closed: list[bytes]
) -> tuple[float, list[float], list[float]]:
    config, env = _config_for(
        dev, workdir / f"max-{variant.api}-{variant.verify_workers}.duckdb", variant
    )
    async with Engine.open(config, environ=env, policy=lambda _c: HoldPolicy()) as engine:
        with tuned_gc():  # as `x402-engine serve` does
            if variant.api == "submit":
                await _submit_closed_loop(engine, warm, CONCURRENCY)
                seconds, lat, comp = await _submit_closed_loop(engine, closed, CONCURRENCY)
            else:
                await _submit_many_closed_loop(engine, warm, MANY_CHUNK, MANY_CONCURRENCY)
                seconds, lat, comp = await _submit_many_closed_loop(
                    engine, closed, MANY_CHUNK, MANY_CONCURRENCY
                )
    return len(closed) / seconds, lat, comp


CONCURRENCY = 256  # concurrent submit callers (like concurrent HTTP requests)
MANY_CHUNK = 500  # payments per submit_many call
MANY_CONCURRENCY = 8  # concurrent submit_many callers


async def measure_engine_ingest(
    dev: DevChain,
    bodies: list[bytes],
    *,
    loads: tuple[float, ...] = (0.25, 0.5, 0.75),
    open_loop_s: float = 4.0,
) -> dict[str, Any]:
    """Maximum ingest rate (closed loop) of every variant on the same payments, each on a fresh
    ledger; then acknowledgement latency at fractions of the per-call API's maximum with verify
    workers (the facilitator service's path), on fresh ledgers and fresh payments."""
    workdir = Path(tempfile.mkdtemp(prefix="x402-bench-ingest-"))
    # Warm-up on a slice the measurement does not reuse.
    warm, rest = bodies[:2000], bodies[2000:]
    n_max = min(len(rest) // 3, 40_000)
    closed, open_pool = rest[:n_max], rest[n_max:]
    runs: list[dict[str, Any]] = []
    headline: dict[str, Any] | None = None
    for variant in variants():
        rate, lat, comp = await _max_rate(dev, workdir, variant, warm, closed)
        run: dict[str, Any] = {
            "name": variant.name,
            "api": variant.api,
            "verify_workers": variant.verify_workers,
            "cores": variant.cores(),
            "payments": len(closed),
            "max_rate_per_s": rate,
            "closed_loop_latency": percentiles(lat),
            "completions_s": comp,
        }
        runs.append(run)
        if variant.api == "submit" and variant.verify_workers:
            headline = run
    assert headline is not None
    result: dict[str, Any] = {
        "variants": runs,
        "headline": headline["name"],
        "max_rate_per_s": headline["max_rate_per_s"],
        "completions_s": headline["completions_s"],
        "offered": [],
    }
    # Latency under offered load, for the per-call API (what the HTTP service uses), in-process
    # and with workers, each at fractions of its own maximum, on fresh payments.
    used = 0
    for variant, run in zip(variants(), runs, strict=True):
        if variant.api != "submit":
            continue
        for fraction in loads:
            rate = run["max_rate_per_s"] * fraction
            n = min(int(rate * open_loop_s), len(open_pool) - used)
            if n < 100:
                break
            slice_ = open_pool[used : used + n]
            used += n
            path = workdir / f"load-{variant.verify_workers}-{fraction}.duckdb"
            config, env = _config_for(dev, path, variant)
            async with Engine.open(config, environ=env, policy=lambda _c: HoldPolicy()) as engine:
                with tuned_gc():
                    await _submit_closed_loop(engine, warm[:500], 64)  # hot paths, warm workers
                    lat = await _submit_open_loop(engine, slice_, rate)
            result["offered"].append(
                {
                    "variant": variant.name,
                    "fraction": fraction,
                    "rate_per_s": rate,
                    "payments": n,
                    **percentiles(lat),
                    "latencies_s": lat,
                }
            )
    return result
