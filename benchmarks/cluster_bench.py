"""The ``cluster`` scenario: the PostgreSQL ledger against DuckDB + journal, and scale-out.

Every case is the production path: ``x402-engine serve`` processes answering ``/settle`` in
deferred mode (acknowledged once durable), load from this process over HTTP, one anvil:

- DuckDB + journal, one instance;
- PostgreSQL (a local server, ``synchronous_commit`` on, fsync on), one instance;
- PostgreSQL, two instances behind a round-robin spread.

For each: the acknowledgement rate with many concurrent requests (closed loop), latency at half
that rate (open loop), and settled/s (first acknowledgement to every payment final). The ledgers
alone are also compared in-process (``Engine.submit``, no HTTP, no chain reads, batches held), as
the ``ingest`` scenario measures DuckDB: what the durable write itself costs. Then the
takeover: one of two instances is SIGKILLed mid-load; measured until the survivor has taken it
over, and until all its payments are final. Ratios are measured in one run on the same machine
(the load generator shares its cores).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import trio

from engine.config import LedgerConfig, PolicyConfig, ServiceConfig
from engine.dev.devchain import Anvil, DevChain, engine_config, free_port, setup_devchain
from engine.dev.postgres import PostgresServer
from engine.engine import Engine
from engine.gctune import tuned_gc
from engine.store.postgres import migrate

from .cluster import cluster, post_open_loop, post_spread
from .http_load import serving
from .ingest import HoldPolicy, _submit_closed_loop, _submit_open_loop, percentiles
from .workload import cached_workload

CONCURRENCY = 128  # concurrent /settle requests in the closed loop
OPEN_LOOP_S = 3.0


async def measure_cluster(
    payments: int, block_time_s: float, lease_s: float = 3.0
) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="x402-bench-cluster-"))
    with Anvil(block_time_s=block_time_s) as anvil, PostgresServer() as pg:
        dev = await setup_devchain(anvil.url, payers=500, signers=2)
        bodies = await trio.to_thread.run_sync(lambda: cached_workload(dev, 11 * payments))
        slices = [bodies[i * 2 * payments : (i + 1) * 2 * payments] for i in range(5)]
        ledgers = [
            await _in_process("DuckDB + journal", dev, workdir / "inproc.duckdb", None, slices[3]),
            await _in_process(
                "PostgreSQL", dev, workdir / "unused", _database(pg, "inproc"), slices[4]
            ),
        ]
        cases: list[dict[str, Any]] = []
        async with serving(_duckdb_config(dev, workdir), _env(dev), workdir, "duck") as url:
            port = int(url.rsplit(":", 1)[1])
            duck = [_Probe("duck", url, port)]
            cases.append(await _case("DuckDB + journal, 1 instance", duck, slices[0], None))
        for count, part in ((1, slices[1]), (2, slices[2])):
            dsn = _database(pg, f"bench{count}")
            async with cluster(dev, dsn, count, workdir / f"pg{count}", lease_s=lease_s) as nodes:
                name = f"PostgreSQL, {count} instance{'s' if count > 1 else ''}"
                cases.append(await _case(name, nodes, part, dsn))
        takeover = await _takeover(dev, pg, bodies[10 * payments :], workdir, lease_s)
    duck_rate = cases[0]["max_rate_per_s"]
    return {
        "payments": payments,
        "cases": cases,
        "pg_vs_duckdb_ingest": cases[1]["max_rate_per_s"] / duck_rate,
        "ledgers": ledgers,
        "pg_vs_duckdb_ledger": ledgers[1]["max_rate_per_s"] / ledgers[0]["max_rate_per_s"],
        "takeover": takeover,
        "lease_s": lease_s,
    }


class _Probe:
    """A serve process started by ``serving`` (never killed: no process handle needed)."""

    def __init__(self, name: str, url: str, port: int) -> None:
        self.name, self.url, self.port = name, url, port


async def _in_process(
    name: str, dev: DevChain, path: Path, dsn: str | None, bodies: list[bytes]
) -> dict[str, Any]:
    """``Engine.submit`` straight (as the ``ingest`` scenario): max rate with 256 callers, then
    acknowledgement latency offered at half that rate."""
    config, env = engine_config(dev, str(path))
    if dsn is not None:
        config = msgspec.structs.replace(
            config, ledger=LedgerConfig(backend="postgres", instance_name="inproc")
        )
        env = {**env, "X402_LEDGER_DSN": dsn}
    config = msgspec.structs.replace(
        config, ingest=msgspec.structs.replace(config.ingest, state_checks=False)
    )
    half = len(bodies) // 2
    async with Engine.open(config, environ=env, policy=lambda _c: HoldPolicy()) as engine:
        with tuned_gc():
            await _submit_closed_loop(engine, bodies[half:][:500], 64)  # warm-up
            seconds, lat, _ = await _submit_closed_loop(engine, bodies[:half], 256)
            rate = half / seconds
            offered = bodies[half + 500 :][: int(rate / 2 * OPEN_LOOP_S)]
            at_half = await _submit_open_loop(engine, offered, rate / 2)
    return {
        "name": name,
        "max_rate_per_s": rate,
        "closed_loop_latency": percentiles(lat),
        "half_rate_latency": percentiles(at_half),
        "offered": len(offered),
    }


def _env(dev: DevChain) -> dict[str, str]:
    return engine_config(dev, ":unused:")[1]


def _duckdb_config(dev: DevChain, workdir: Path) -> Any:
    config, _ = engine_config(dev, str(workdir / "duck.duckdb"), policy=PolicyConfig())
    return msgspec.structs.replace(
        config, service=ServiceConfig(port=free_port(), settlement="deferred")
    )


def _database(pg: PostgresServer, name: str) -> str:
    with psycopg.connect(pg.dsn, autocommit=True) as con:
        con.execute(f"CREATE DATABASE {name}")
    dsn = pg.dsn.rsplit("/", 1)[0] + "/" + name
    migrate(dsn)
    return dsn


async def _case(
    name: str, nodes: list[Any], bodies: list[bytes], dsn: str | None
) -> dict[str, Any]:
    half = len(bodies) // 2
    closed, rest = bodies[:half], bodies[half:]
    await post_spread(nodes, "/settle", rest[:200], 32)  # warm-up
    start = time.perf_counter()
    answers = await post_spread(nodes, "/settle", closed, CONCURRENCY)
    seconds = time.perf_counter() - start
    docs = [msgspec.json.decode(a.body) for a in answers if a is not None]
    acked = sum(1 for d in docs if d.get("success"))
    rate = acked / seconds
    offered = rest[200:][: int(rate / 2 * OPEN_LOOP_S)]
    latencies = await post_open_loop(nodes, "/settle", offered, rate / 2)
    settled_s = await _until_settled(nodes, dsn, start)
    total = acked + len(offered) + 200
    return {
        "name": name,
        "instances": len(nodes),
        "acknowledged": acked,
        "max_rate_per_s": rate,
        "closed_loop_latency": percentiles([a.latency_s for a in answers if a is not None]),
        "half_rate_per_s": rate / 2,
        "half_rate_latency": percentiles(latencies),
        "settled_per_s": total / settled_s,
    }


async def _until_settled(nodes: list[Any], dsn: str | None, start: float) -> float:
    """Seconds from ``start`` until nothing is pending (every instance's /admin/progress)."""
    import httpx

    async with httpx.AsyncClient(timeout=30) as client:
        with trio.fail_after(600):
            while True:
                pending = 0
                for node in nodes:
                    progress = (await client.get(node.url + "/admin/progress")).json()
                    pending += progress["pending"] + sum(progress["queued"].values())
                if pending == 0:
                    return time.perf_counter() - start
                await trio.sleep(0.1)


async def _takeover(
    dev: DevChain, pg: PostgresServer, bodies: list[bytes], workdir: Path, lease_s: float
) -> dict[str, Any]:
    """Two instances under load; one SIGKILLed while the survivor takes the rest of the load:
    seconds until it is taken over, and until every payment it had acknowledged is final."""
    dsn = _database(pg, "takeover")
    slow = PolicyConfig(max_batch_size=200, max_wait_ms=2000)  # work waits at the victim
    async with cluster(dev, dsn, 2, workdir / "takeover", lease_s=lease_s, policy=slow) as nodes:
        await post_spread(nodes, "/settle", bodies[: len(bodies) // 2], 64)
        victim = nodes[1]
        victim.kill()
        killed = time.perf_counter()
        times: dict[str, float] = {}

        async def watch() -> None:  # while the survivor takes the rest of the load
            with trio.fail_after(120):
                while "all_final_s" not in times:
                    taken, open_of_victim = await trio.to_thread.run_sync(_takeover_state, dsn)
                    now = time.perf_counter() - killed
                    if taken:
                        times.setdefault("taken_over_s", now)
                        if open_of_victim == 0:
                            times["all_final_s"] = now
                    await trio.sleep(0.1)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            await post_spread(nodes[:1], "/settle", bodies[len(bodies) // 2 :], 64)
    return times


def _takeover_state(dsn: str) -> tuple[bool, int]:
    with psycopg.connect(dsn) as con:
        row = con.execute(
            "SELECT (SELECT count(*) FROM instances WHERE name = 'i2' AND successor IS NOT NULL),"
            " (SELECT count(*) FROM payments p JOIN instances i ON i.id = p.instance_id"
            " WHERE i.name = 'i2' AND NOT EXISTS (SELECT 1 FROM payment_events e"
            " WHERE e.payment_id = p.id AND e.state IN ('settled', 'failed')))"
        ).fetchone()
    assert row is not None
    return bool(row[0]), int(row[1])
