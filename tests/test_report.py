"""``x402-engine report``: exact amounts grouped by day/payee/payer/status, CSV and Parquet
exports, and the accepted-versus-settled chart, from a ledger an engine wrote on anvil."""

from __future__ import annotations

import csv
import time
from decimal import Decimal
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from engine.cli import main as cli_main
from engine.dev.devchain import Anvil, engine_config, new_key, setup_devchain
from engine.dev.loadgen import payment_v2
from engine.engine import Engine
from engine.store.ledger import Ledger
from engine.store.report import build_report

pytestmark = pytest.mark.chain
VALUE = 1000


async def test_report_totals_exports_and_chart(
    anvil: Anvil,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dev = await setup_devchain(anvil.url, payers=4)
    path = tmp_path / "ledger.duckdb"
    config, env = engine_config(dev, str(path))
    payee = bytes.fromhex(dev.payee[2:])
    now = int(time.time())
    good = [
        payment_v2(dev.domain, k, payee, VALUE * (i + 1), now)
        for i, k in enumerate(dev.payer_key_bytes())
    ]
    broke = payment_v2(dev.domain, new_key(), payee, 7 * VALUE, now)  # a payer with no tokens
    async with Engine.open(config, environ=env) as engine:
        for payload, req in [*good, broke]:
            await engine.submit(payload, req)
        await engine.drain(timeout_s=60)

    ledger = Ledger(path)
    columns, rows = build_report(ledger, "status")
    ledger.close()
    by_status = {r[0]: dict(zip(columns, r, strict=True)) for r in rows}
    assert by_status["settled"]["payments"] == 4
    assert by_status["settled"]["settled_value"] == Decimal(10 * VALUE)  # 1+2+3+4 thousand
    assert by_status["settled"]["gas_per_settled_payment"] > 30_000
    assert by_status["settled"]["fee_wei"] > 0
    assert by_status["failed"]["uncollected_value"] == Decimal(7 * VALUE)

    out_csv, out_parquet, out_png = tmp_path / "r.csv", tmp_path / "r.parquet", tmp_path / "v.png"
    code = cli_main(
        [
            "report",
            "--ledger",
            str(path),
            "--by",
            "payee",
            "--csv",
            str(out_csv),
            "--parquet",
            str(out_parquet),
            "--chart",
            str(out_png),
        ]
    )
    assert code == 0
    with out_csv.open() as f:
        (row,) = list(csv.DictReader(f))
    assert row["payee"] == dev.payee and row["payments"] == "5"
    assert row["accepted_value"] == str(17 * VALUE) and row["uncollected_value"] == str(7 * VALUE)
    table = pq.read_table(out_parquet).to_pylist()
    assert table[0]["settled_value"] == Decimal(10 * VALUE)  # exact decimals, not floats
    png = out_png.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    # An 80-column terminal gets every column whole (the table wants ~200 columns): no line
    # longer than 80, no header cut short, every column named with its value.
    capsys.readouterr()
    monkeypatch.setenv("COLUMNS", "80")
    assert cli_main(["report", "--ledger", str(path), "--by", "status"]) == 0
    shown = capsys.readouterr().out
    lines = [line for line in shown.splitlines() if not line.startswith("from ")]  # the path
    assert all(len(line) <= 80 for line in lines), shown
    assert "…" not in shown
    assert all(name in shown for name in columns), shown
    assert "uncollected_value 7,000" in shown, shown
    monkeypatch.setenv("COLUMNS", "250")  # wide enough: the table
    assert cli_main(["report", "--ledger", str(path), "--by", "status"]) == 0
    assert "┃ status" in capsys.readouterr().out
