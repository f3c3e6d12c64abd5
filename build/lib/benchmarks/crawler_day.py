"""A crawler day: ``crawlers`` payers each make ``requests`` paid requests at $0.001 to ``sites``
payees; the sites settle at midnight UTC in one sweep. Compared, on a fresh chain of the same
size, with the same payments settled as they come (the ``immediate`` policy).

The day's arrivals are compressed: payments are ingested as fast as the engine takes them
(``submit_many``, in the order a day of crawling would produce), on a trio ``MockClock`` running
at real speed, and the clock then jumps to midnight; the sweep runs in real time against anvil.
Measured: transactions, gas per payment, sweep duration, peak resident memory of the process and
the ledger's size on disk, and how much the engine's resident memory grew while it held the
day's payments (the process's peak also counts the signed workload itself).
"""

from __future__ import annotations

import calendar
import os
import random
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import trio
import trio.testing
from rich.progress import Progress

from engine.chain import crypto
from engine.clock import TrioWallClock
from engine.config import CreditConfig, PayeeScheduleConfig, PolicyConfig
from engine.dev.devchain import Anvil, DevChain, engine_config, new_key, setup_devchain
from engine.engine import Engine
from engine.model import hex_addr

from .scale import ledger_disk_bytes, rss_bytes
from .workload import BENCH_SEED, CACHE_DIR

PRICE = 1000  # $0.001 in a 6-decimal token


class Day(msgspec.Struct, frozen=True):
    crawlers: int
    requests: int  # per crawler
    sites: int


class _Signed(msgspec.Struct):
    valid_before: int
    sites: list[str]
    items: list[tuple[bytes, bytes]]  # (payload JSON, requirements JSON), in arrival order


def _sites(count: int) -> list[bytes]:
    return [crypto.private_key_address(new_key(BENCH_SEED, "site", i)) for i in range(count)]


def _sign_day(
    dev: DevChain, day: Day, valid_before: int, progress: Progress
) -> list[tuple[bytes, bytes]]:
    """The day's payments in arrival order (crawlers interleaved at random, seeded)."""
    keys = dev.payer_key_bytes()[: day.crawlers]
    payers = [crypto.private_key_address(k) for k in keys]
    sites = _sites(day.sites)
    sep = dev.domain.separator
    rng = random.Random(7)
    order = [c for c in range(day.crawlers) for _ in range(day.requests)]
    rng.shuffle(order)
    enc = msgspec.json.Encoder()
    reqs = {
        s: enc.encode(
            {
                "scheme": "exact",
                "network": f"eip155:{dev.chain_id}",
                "amount": str(PRICE),
                "asset": dev.token,
                "payTo": hex_addr(s),
                "maxTimeoutSeconds": 300,
                "extra": {"name": dev.token_name, "version": dev.token_version},
            }
        )
        for s in sites
    }
    task = progress.add_task("crawler day: signing", total=len(order))
    out: list[tuple[bytes, bytes]] = []
    for n, c in enumerate(order):
        site = sites[rng.randrange(day.sites)]
        nonce = os.urandom(32)
        digest = crypto.transfer_digest(sep, payers[c], site, PRICE, 0, valid_before, nonce)
        sig = crypto.sign_digest(keys[c], digest)
        payload = {
            "x402Version": 2,
            "accepted": msgspec.json.decode(reqs[site]),
            "payload": {
                "signature": "0x" + sig.hex(),
                "authorization": {
                    "from": hex_addr(payers[c]),
                    "to": hex_addr(site),
                    "value": str(PRICE),
                    "validAfter": "0",
                    "validBefore": str(valid_before),
                    "nonce": "0x" + nonce.hex(),
                },
            },
        }
        out.append((enc.encode(payload), reqs[site]))
        if n % 5000 == 4999:
            progress.advance(task, 5000)
    return out


def _cached_day(dev: DevChain, day: Day, progress: Progress) -> list[tuple[bytes, bytes]]:
    name = f"crawler-day-{dev.chain_id}-{dev.token}-{day.crawlers}-{day.requests}-{day.sites}"
    path = CACHE_DIR / f"{name}.msgpack"
    now = int(time.time())
    if path.exists():
        cached = msgspec.msgpack.decode(path.read_bytes(), type=_Signed)
        if cached.valid_before > now + 2 * 86_400:
            return cached.items
    valid_before = now + 4 * 86_400  # beyond the simulated day and the real sweep
    items = _sign_day(dev, day, valid_before, progress)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(
        msgspec.msgpack.encode(
            _Signed(valid_before, [hex_addr(s) for s in _sites(day.sites)], items)
        )
    )
    tmp.replace(path)
    return items


async def _run(
    mode: str, day: Day, progress: Progress, mock_clock: trio.testing.MockClock
) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"x402-bench-crawler-{mode}-"))
    ledger = workdir / "ledger.duckdb"
    # Mind the machine: on the full size (a million payments) anvil grew past 22 GB by about
    # 700,000 settled payments, with or without --prune-history, and the kernel killed it.
    with Anvil(block_time_s=1.0) as anvil:
        dev = await setup_devchain(
            anvil.url, payers=day.crawlers, payer_balance=day.requests * PRICE, seed=BENCH_SEED
        )
        items = _cached_day(dev, day, progress)
        sites = _sites(day.sites)
        payees = [
            PayeeScheduleConfig(payee=hex_addr(s), mode="scheduled", times_utc=["00:00"])
            for s in sites
        ]
        config, env = engine_config(
            dev,
            str(ledger),
            policy=PolicyConfig(max_wait_ms=500, payees=payees if mode == "end-of-day" else []),
            max_inflight_batches=8,
        )
        config = msgspec.structs.replace(config, credit=CreditConfig(refresh_s=3600.0))
        today = time.gmtime()
        day_start = calendar.timegm((today.tm_year, today.tm_mon, today.tm_mday, 0, 0, 0))
        clock_start = day_start + 60
        rss_before = rss_bytes()
        async with Engine.open(config, environ=env, clock=TrioWallClock(clock_start)) as engine:
            task = progress.add_task(f"crawler day ({mode}): ingest", total=len(items))
            start = time.perf_counter()
            for i in range(0, len(items), 2000):
                results = await engine.submit_many(items[i : i + 2000])
                assert all(getattr(r, "id", None) for r in results), results[:3]
                progress.advance(task, len(results))
            ingest_s = time.perf_counter() - start
            rss_growth = rss_bytes() - rss_before  # the engine holding the day's payments
            if mode == "end-of-day":
                assert engine.statistics().batches_sent == 0
                mock_clock.jump(day_start + 86_400 - engine.clock.now())  # to midnight UTC
            sweep_start = time.perf_counter()
            sweep = progress.add_task(f"crawler day ({mode}): settle", total=len(items))
            while engine.statistics().pending:
                progress.update(sweep, completed=len(items) - engine.statistics().pending)
                await trio.sleep(0.5)
            sweep_s = time.perf_counter() - sweep_start
            stats = engine.statistics()
            (txs,) = (await engine.query("SELECT count(*) FROM batches"))[0]
    return {
        "mode": mode,
        "payments": len(items),
        "settled": stats.settled,
        "failed": stats.failed,
        "transactions": int(txs),
        "gas_per_payment": stats.gas_used / max(1, stats.items_in_mined_batches),
        "ingest_s": ingest_s,
        "ingest_per_s": len(items) / ingest_s,
        "settle_s": sweep_s,
        "ledger_bytes": ledger_disk_bytes(ledger),
        "engine_rss_growth_bytes": rss_growth,
        "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def measure_crawler_day(
    day: Day, progress: Progress, modes: tuple[str, ...] = ("end-of-day", "immediate")
) -> list[dict[str, Any]]:
    """End-of-day sweep, then immediate settlement of the same day on a fresh chain."""
    out: list[dict[str, Any]] = []
    for mode in modes:
        clock = trio.testing.MockClock(rate=1.0)
        out.append(trio.run(_run, mode, day, progress, clock, clock=clock))
    return out
