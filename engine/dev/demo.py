"""The demo: a devchain, the engine, and a synthetic load of signed payments."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import trio
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..chain.rpc import Rpc
from ..config import PolicyConfig
from ..engine import Engine
from ..model import Accepted, PaymentPayloadV2, RequirementsV2
from .devchain import (
    Anvil,
    DevChain,
    approve_permit2,
    engine_config,
    setup_devchain,
    token_balance,
)
from .loadgen import payment_permit2_v2, payment_v2


class DemoResult(msgspec.Struct):
    payments: int
    accepted: int
    rejected: dict[str, int]
    settled: int
    failed: dict[str, int]
    batches: int
    gas_used: int
    gas_per_payment: float
    ingest_s: float
    elapsed_s: float
    settled_per_s: float
    ack_latency_ms_p50: float
    ack_latency_ms_p99: float
    payee_received: int
    payee_expected: int


def sign_workload(
    dev: DevChain, payments: int, value: int, now: int, permit2_payers: int = 0
) -> list[tuple[PaymentPayloadV2, RequirementsV2]]:
    """``payments`` payments round-robin over the payers; the first ``permit2_payers`` payers
    pay with Permit2, the rest with EIP-3009."""
    keys = dev.payer_key_bytes()
    payee = bytes.fromhex(dev.payee[2:])
    domain = dev.domain
    sep = domain.separator
    workload = []
    for i in range(payments):
        payer = i % len(keys)
        if payer < permit2_payers:
            workload.append(payment_permit2_v2(domain, keys[payer], payee, value, now))
        else:
            workload.append(payment_v2(domain, keys[payer], payee, value, now, separator=sep))
    return workload


async def _submit_all(
    engine: Engine,
    workload: list[tuple[PaymentPayloadV2, RequirementsV2]],
    concurrency: int,
    latencies: list[float],
    accepted: list[int],
    on_answer: Callable[[], None],
) -> None:
    """Submit every payment with ``concurrency`` callers at once; record each answer's latency
    and the accepted ids."""
    send, receive = trio.open_memory_channel[tuple[PaymentPayloadV2, RequirementsV2]](concurrency)

    async def producer() -> None:
        async with send:
            for item in workload:
                await send.send(item)

    async def worker(
        rx: trio.MemoryReceiveChannel[tuple[PaymentPayloadV2, RequirementsV2]],
    ) -> None:
        async with rx:
            async for payload, req in rx:
                t0 = time.perf_counter()
                result = await engine.submit(payload, req)
                latencies.append(time.perf_counter() - t0)
                if isinstance(result, Accepted):
                    accepted.append(result.id)
                on_answer()

    async with trio.open_nursery() as load:
        load.start_soon(producer)
        for _ in range(concurrency):
            load.start_soon(worker, receive.clone())
        await receive.aclose()


# Longer than our ~60-line rule on purpose: the demo reads top to bottom as the script an
# operator follows (chain, payers, engine, load, drain, figures); its parts are helpers above.
async def run_demo(
    *,
    payments: int = 5000,
    payers: int = 500,
    value: int = 1000,
    concurrency: int = 64,
    block_time_s: float = 1.0,
    mode: str = "compact",
    ledger_dir: Path | None = None,
    console: Console | None = None,
    permit2_share: float = 0.1,
) -> DemoResult:
    console = console or Console()
    workdir = Path(ledger_dir or tempfile.mkdtemp(prefix="x402-demo-"))
    with Anvil(block_time_s=block_time_s) as anvil:
        console.print(f"anvil on {anvil.url} (block time {block_time_s or 'automine'} s)")
        dev = await setup_devchain(anvil.url, payers=payers)
        console.print(f"token {dev.token}, batcher {dev.batcher}, {payers} funded payers")
        permit2_payers = int(payers * permit2_share) if mode == "compact" else 0
        if permit2_payers:
            # A Permit2 payer's one-time step before its first payment.
            rpc = Rpc(anvil.url)
            gas = await approve_permit2(
                rpc, dev.chain_id, dev.token, dev.payer_keys[:permit2_payers]
            )
            await rpc.aclose()
            console.print(
                f"{permit2_payers} payers pay with Permit2: each approved Permit2 once"
                f" (token.approve, {gas // permit2_payers:,} gas each, paid by the payer)"
            )
        workload = sign_workload(dev, payments, value, int(time.time()), permit2_payers)
        config, env = engine_config(
            dev,
            str(workdir / "ledger.duckdb"),
            mode=mode,
            policy=PolicyConfig(),
            poll_interval_ms=100,
        )
        rpc = Rpc(anvil.url)
        before = await token_balance(rpc, dev.token, dev.payee)
        latencies: list[float] = []
        accepted: list[int] = []
        start = time.perf_counter()
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        ) as progress:
            async with Engine.open(config, environ=env) as engine:
                ingest_task = progress.add_task("accepted", total=payments)
                settle_task = progress.add_task("final   ", total=payments)

                async def watch() -> None:
                    while True:
                        s = engine.statistics()
                        progress.update(settle_task, completed=s.settled + sum(s.failed.values()))
                        await trio.sleep(0.2)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(watch)
                    await _submit_all(
                        engine,
                        workload,
                        concurrency,
                        latencies,
                        accepted,
                        lambda: progress.advance(ingest_task),
                    )
                    ingest_s = time.perf_counter() - start
                    await engine.drain(timeout_s=600)
                    nursery.cancel_scope.cancel()
                elapsed = time.perf_counter() - start
                stats = engine.statistics()
                progress.update(settle_task, completed=stats.settled + sum(stats.failed.values()))
        after = await token_balance(rpc, dev.token, dev.payee)
        await rpc.aclose()
    lat_ms = sorted(x * 1000 for x in latencies)
    p99 = lat_ms[min(len(lat_ms) - 1, int(len(lat_ms) * 0.99))] if lat_ms else 0.0
    settled = stats.settled
    return DemoResult(
        payments=payments,
        accepted=len(accepted),
        rejected=stats.rejected,
        settled=settled,
        failed=stats.failed,
        batches=stats.batches_mined,
        gas_used=stats.gas_used,
        gas_per_payment=stats.gas_used / max(1, stats.items_in_mined_batches),
        ingest_s=ingest_s,
        elapsed_s=elapsed,
        settled_per_s=settled / elapsed if elapsed else 0.0,
        ack_latency_ms_p50=statistics.median(lat_ms) if lat_ms else 0.0,
        ack_latency_ms_p99=p99,
        payee_received=after - before,
        payee_expected=settled * value,
    )


def print_result(result: DemoResult, console: Console) -> None:
    table = Table(title="x402 batch settlement demo", show_header=False)
    rows = [
        ("payments offered", f"{result.payments:,}"),
        ("accepted (durable)", f"{result.accepted:,}"),
        ("rejected", str(result.rejected or "none")),
        ("settled", f"{result.settled:,}"),
        ("failed by reason", str(result.failed or "none")),
        ("batches (transactions)", f"{result.batches:,}"),
        ("gas per payment", f"{result.gas_per_payment:,.0f}"),
        ("ingest time", f"{result.ingest_s:.2f} s"),
        (
            "ack latency p50 / p99",
            f"{result.ack_latency_ms_p50:.2f} / {result.ack_latency_ms_p99:.2f} ms",
        ),
        ("elapsed (to last settlement)", f"{result.elapsed_s:.2f} s"),
        ("settled per second", f"{result.settled_per_s:,.0f}"),
        ("payee received / expected", f"{result.payee_received:,} / {result.payee_expected:,}"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)
