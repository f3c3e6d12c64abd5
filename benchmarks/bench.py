"""``x402-engine bench``: named scenarios, progress on the console, results on disk.

Scenarios: ``ingest`` (engine ingest vs bare secp256k1 recovery vs the official SDK's verify),
``settlement`` (one tx per payment vs aggregate3 vs compact on fresh anvils), ``scale`` (dedup
memory, ledger size, restart time). ``--quick`` shrinks every scenario to finish in about a
minute. Writes results.json, throughput.png, latency_cdf.png, gas_per_payment.png and
summary.md to ``--out``; the figures have a panel per scenario that ran (ingest, settlement),
and a figure none of whose scenarios ran is not written.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import trio
from rich.console import Console
from rich.markdown import Markdown
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from engine.dev.devchain import Anvil, setup_devchain

from . import report
from .cluster_bench import measure_cluster
from .crawler_day import Day, measure_crawler_day
from .ingest import bare_recovery_rates, measure_engine_ingest
from .scale import measure_scale
from .settlement import measure_settlement
from .workload import BENCH_SEED, cached_workload

SCENARIOS = ("ingest", "settlement", "scale", "crawler-day", "cluster")


class Profile(msgspec.Struct, frozen=True):
    name: str
    ingest_payments: int
    ingest_payers: int
    open_loop_s: float
    sdk_payloads: int
    settle_payments: int
    settle_payers: int
    block_time_s: float
    scale_entries: int
    crawler_day: Day
    cluster_payments: int


QUICK = Profile("quick", 40_000, 200, 1.0, 50, 400, 400, 1.0, 50_000, Day(20, 500, 5), 1500)
# The crawler day at a tenth of its nominal size (100 x 10,000 to 20 sites): at a million
# payments anvil itself ran out of this machine's 24 GB mid-sweep. --crawler-day 100x10000x20
# asks for the nominal size on a larger machine.
FULL = Profile(
    "full", 200_000, 2000, 3.0, 300, 5000, 5000, 1.0, 1_000_000, Day(100, 1000, 20), 8000
)


def run(scenarios: list[str], profile: Profile, out: Path, console: Console) -> dict[str, Any]:
    results: dict[str, Any] = {
        "profile": profile.name,
        "command": " ".join(["x402-engine", *sys.argv[1:]]),
        "machine": (
            f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
        ),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console
    ) as progress:
        if "ingest" in scenarios:
            task = progress.add_task("ingest: chain and signed workload", total=None)
            with Anvil() as anvil:
                dev = trio.run(
                    lambda: setup_devchain(anvil.url, payers=profile.ingest_payers, seed=BENCH_SEED)
                )
                bodies = cached_workload(dev, profile.ingest_payments, progress=progress)
                progress.update(task, description="ingest: bare secp256k1 recovery")
                recovery = bare_recovery_rates(dev, bodies[: min(20_000, len(bodies))])
                progress.update(task, description="ingest: official x402 SDK verify")
                from .sdk_reference import sdk_verify_rate

                sdk = sdk_verify_rate(
                    anvil.url, dev.chain_id, dev.signer_keys[0], bodies[-profile.sdk_payloads :]
                )
                progress.update(task, description="ingest: engine, max rate and offered loads")
                engine = trio.run(
                    lambda: measure_engine_ingest(
                        dev,
                        bodies[: -profile.sdk_payloads],
                        open_loop_s=profile.open_loop_s,
                    )
                )
            results["ingest"] = {"recovery": recovery, "sdk": sdk, "engine": engine}
            progress.update(task, description="ingest: done", total=1, completed=1)
        if "settlement" in scenarios:
            task = progress.add_task("settlement: single, aggregate3, compact", total=None)
            results["settlement"] = trio.run(
                measure_settlement,
                profile.settle_payments,
                profile.settle_payers,
                profile.block_time_s,
            )
            progress.update(task, description="settlement: done", total=1, completed=1)
        if "scale" in scenarios:
            task = progress.add_task(f"scale: {profile.scale_entries:,} live entries", total=None)
            results["scale"] = trio.run(measure_scale, profile.scale_entries)
            progress.update(task, description="scale: done", total=1, completed=1)
        if "crawler-day" in scenarios:
            results["crawler_day"] = measure_crawler_day(profile.crawler_day, progress)
        if "cluster" in scenarios:
            task = progress.add_task("cluster: DuckDB, PostgreSQL x1, x2, takeover", total=None)
            results["cluster"] = trio.run(
                measure_cluster, profile.cluster_payments, profile.block_time_s
            )
            progress.update(task, description="cluster: done", total=1, completed=1)
    files = report.write(results, out)
    console.print(Markdown((out / "summary.md").read_text()))
    console.print(f"wrote {', '.join(str(out / f) for f in files)}")
    return results
