"""Scale: memory per live authorization in the dedup index, ledger bytes per payment, and the
time to restart and recover with that many payments pending."""

from __future__ import annotations

import gc
import os
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from engine.dev.devchain import Anvil, setup_devchain
from engine.dev.devchain import engine_config as make_config
from engine.engine import Engine
from engine.model import Payment
from engine.stages.dedup import DedupIndex
from engine.store.ledger import Ledger

from .ingest import HoldPolicy
from .workload import BENCH_SEED


def _payments(n: int, chain_id: int, token: bytes, payee: bytes) -> list[Payment]:
    """Structurally valid payments (random nonces and signatures): recovery after a restart
    does not re-verify signatures, and memory does not depend on them."""
    valid_before = int(time.time()) + 7 * 24 * 3600
    payers = [os.urandom(20) for _ in range(1000)]
    return [
        Payment(
            chain_id=chain_id,
            token=token,
            payer=payers[i % 1000],
            payee=payee,
            value=1000,
            valid_after=0,
            valid_before=valid_before,
            nonce=os.urandom(32),
            signature=os.urandom(64) + b"\x1b",
            network=f"eip155:{chain_id}",
            x402_version=2,
        )
        for i in range(n)
    ]


def rss_bytes() -> int:
    """This process's resident memory now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def ledger_disk_bytes(path: Path) -> int:
    """A ledger's size on disk: the DuckDB file, its WAL and its journal segments."""
    total = path.stat().st_size if path.exists() else 0
    for extra in (path.with_name(path.name + ".wal"), path.with_name(path.name + ".journal")):
        if extra.is_dir():
            total += sum(f.stat().st_size for f in extra.iterdir())
        elif extra.exists():
            total += extra.stat().st_size
    return total


def dedup_bytes_per_entry(payments: list[Payment]) -> float:
    gc.collect()
    tracemalloc.start()
    index = DedupIndex()
    for i, p in enumerate(payments):
        index.claim(p, i + 1)
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(index) == len(payments)
    return current / len(payments)


async def measure_scale(n: int) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="x402-bench-scale-"))
    with Anvil() as anvil:
        dev = await setup_devchain(anvil.url, payers=1, seed=BENCH_SEED)
        payments = _payments(
            n, dev.chain_id, bytes.fromhex(dev.token[2:]), bytes.fromhex(dev.payee[2:])
        )
        dedup = dedup_bytes_per_entry(payments)
        path = workdir / "ledger.duckdb"
        ledger = Ledger(path)
        start = time.perf_counter()
        for i in range(0, n, 10_000):
            ledger.insert_payments(
                [(i + k + 1, p, 0) for k, p in enumerate(payments[i : i + 10_000])]
            )
        write_s = time.perf_counter() - start
        ledger.close()
        size = ledger_disk_bytes(path)
        del payments
        gc.collect()
        config, env = make_config(dev, str(path))
        rss_before = rss_bytes()
        start = time.perf_counter()
        async with Engine.open(config, environ=env, policy=lambda _c: HoldPolicy()) as engine:
            restart_s = time.perf_counter() - start
            pending = engine.statistics().pending
            gc.collect()
            # Everything the running engine holds per pending payment: dedup entry, tracker,
            # batch pool item, Payment record (and DuckDB's buffers, which do not shrink).
            rss_per_pending = (rss_bytes() - rss_before) / max(1, pending)
    return {
        "live_authorizations": n,
        "dedup_bytes_per_entry": dedup,
        "ledger_bytes_per_payment": size / n,
        "ledger_write_rows_per_s": n / write_s,
        "restart_s": restart_s,
        "restart_pending": pending,
        "engine_rss_bytes_per_pending": rss_per_pending,
    }
