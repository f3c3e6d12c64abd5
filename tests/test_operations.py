"""Operations while serving: ``report``, ``sweep`` and ad hoc SQL against a running deployment,
on both ledgers, with no lock traceback: DuckDB through the service that holds the file,
PostgreSQL straight from the database and through every live instance."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec
import psycopg
import pytest
import trio

from benchmarks.cluster import cluster, post_spread, settle_body
from benchmarks.http_load import serving
from engine.config import PolicyConfig, ServiceConfig
from engine.dev.devchain import Anvil, DevChain, engine_config, free_port, setup_devchain
from engine.dev.loadgen import payment_v2

pytestmark = pytest.mark.chain
ROOT = Path(__file__).resolve().parent.parent
VALUE = 1000
# payments wait for an hourly window: only a sweep settles them during the test
HOURLY = PolicyConfig(mode="windowed", window_s=3600)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "COLUMNS": "300"},  # the report's table, uncut
    )


def _bodies(dev: DevChain, count: int) -> list[bytes]:
    keys = dev.payer_key_bytes()
    payee = bytes.fromhex(dev.payee[2:])
    now = int(time.time())
    return [
        settle_body(*payment_v2(dev.domain, keys[i % len(keys)], payee, VALUE, now))
        for i in range(count)
    ]


async def test_report_sweep_and_sql_work_while_serve_holds_the_duckdb_ledger(
    anvil: Anvil, tmp_path: Path
) -> None:
    dev = await setup_devchain(anvil.url, payers=5)
    config, env = engine_config(dev, str(tmp_path / "ledger.duckdb"), policy=HOURLY)
    config = msgspec.structs.replace(
        config, service=ServiceConfig(port=free_port(), settlement="deferred")
    )
    async with serving(config, env, tmp_path, "svc") as url:
        answers = await post_spread_one(url, _bodies(dev, 6))
        assert all(msgspec.json.decode(a.body)["success"] for a in answers)
        cfg, envfile = str(tmp_path / "svc.toml"), str(tmp_path / "svc.env")
        report = await trio.to_thread.run_sync(
            lambda: _cli("report", "--config", cfg, "--by", "status")
        )
        assert report.returncode == 0, report.stderr
        assert "Traceback" not in report.stderr
        assert "through the service" in report.stdout and "accepted" in report.stdout
        swept = await trio.to_thread.run_sync(
            lambda: _cli("sweep", "--config", cfg, "--env-file", envfile, "--timeout", "60")
        )
        assert swept.returncode == 0, swept.stderr
        assert "6 payments waiting" in swept.stdout, swept.stdout
        async with httpx.AsyncClient(base_url=url) as client:
            sql = "SELECT count(*) FROM payment_events WHERE state = ?"
            doc = (
                await client.post("/admin/query", json={"sql": sql, "params": ["settled"]})
            ).json()
            assert doc["rows"] == [[6]] and doc["dialect"] == "duckdb"
            # read-only: a write is rolled back, the ledger unchanged
            await client.post("/admin/query", json={"sql": "DELETE FROM payments"})
            doc = (
                await client.post("/admin/query", json={"sql": "SELECT count(*) FROM payments"})
            ).json()
            assert doc["rows"] == [[6]]


async def post_spread_one(url: str, bodies: list[bytes]) -> list[Any]:
    from benchmarks.http_load import post_all

    return await post_all(url, "/settle", bodies, 8)


async def test_report_and_sweep_work_against_a_serving_postgres_cluster(
    anvil: Anvil, pg_dsn: str, tmp_path: Path
) -> None:
    dev = await setup_devchain(anvil.url, payers=8, signers=2)
    async with cluster(dev, pg_dsn, 2, tmp_path, policy=HOURLY) as nodes:
        answers = await post_spread(nodes, "/settle", _bodies(dev, 10), 8)
        assert all(a is not None and msgspec.json.decode(a.body)["success"] for a in answers)
        cfg, envfile = str(tmp_path / "i1.toml"), str(tmp_path / "i1.env")
        report = await trio.to_thread.run_sync(
            lambda: _cli("report", "--config", cfg, "--env-file", envfile, "--by", "status")
        )
        assert report.returncode == 0, report.stderr
        assert "PostgreSQL" in report.stdout and "accepted" in report.stdout
        swept = await trio.to_thread.run_sync(
            lambda: _cli("sweep", "--config", cfg, "--env-file", envfile, "--timeout", "60")
        )
        assert swept.returncode == 0, swept.stderr
        assert "swept by 2 live instance(s): 10 payments were waiting" in swept.stdout
        with psycopg.connect(pg_dsn) as con:
            settled = con.execute(
                "SELECT count(DISTINCT payment_id) FROM payment_events WHERE state = 'settled'"
            ).fetchone()
        assert settled == (10,)
