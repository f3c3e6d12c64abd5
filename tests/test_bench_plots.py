"""The PNGs ``x402-engine bench`` writes (benchmarks/report.py), checked on the matplotlib
figures themselves: one panel per scenario that ran, and every settlement run readable."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from benchmarks import report

PNG = b"\x89PNG\r\n\x1a\n"


def _ingest() -> dict[str, Any]:
    """The shape ``measure_engine_ingest`` returns (under ``results["ingest"]["engine"]``)."""
    latency = {"p50_ms": 1.0, "p99_ms": 4.0, "p999_ms": 9.0}
    variants: list[dict[str, Any]] = [
        {
            "name": name,
            "api": "submit",
            "verify_workers": workers,
            "cores": cores,
            "payments": 2000,
            "max_rate_per_s": rate,
            "closed_loop_latency": {"p50_ms": 1.0, "p99_ms": 5.0},
            "completions_s": [i / rate for i in range(2000)],
        }
        for name, workers, cores, rate in [("in-process", 0, 1, 8000.0), ("workers", 4, 4, 20000.0)]
    ]
    offered = [
        {
            "variant": v["name"],
            "fraction": fraction,
            "rate_per_s": v["max_rate_per_s"] * fraction,
            "payments": 500,
            **latency,
            "latencies_s": [0.0005 + i * 1e-5 for i in range(500)],
        }
        for v in variants
        for fraction in (0.25, 0.5, 0.75)
    ]
    return {
        "recovery": {"one_core_per_s": 10000.0, "all_cores_per_s": 30000.0},
        "sdk": {"rate_per_s": 900.0},
        "engine": {
            "variants": variants,
            "headline": "workers",
            "max_rate_per_s": 20000.0,
            "completions_s": variants[1]["completions_s"],
            "offered": offered,
        },
    }


def _settlement_run(mode: str, settled_at_s: list[float], gas: float) -> dict[str, Any]:
    """The shape ``benchmarks.settlement.run_mode`` returns."""
    elapsed = max(settled_at_s) + 0.3
    return {
        "mode": mode,
        "payments": len(settled_at_s),
        "settled": len(settled_at_s),
        "failed": 0,
        "transactions": len(settled_at_s) if mode == "single" else 2,
        "elapsed_s": elapsed,
        "ingest_s": 0.2,
        "settled_per_s": len(settled_at_s) / elapsed,
        "gas_per_payment": gas,
        "tx_bytes_per_payment": 120.0,
        "latency": {"p50_ms": 1500.0, "p99_ms": 2500.0},
        "latencies_s": [t - 0.1 for t in settled_at_s],
        "settled_at_s": settled_at_s,
    }


def _settlement(shape: str = "full") -> list[dict[str, Any]]:
    """Shapes seen on anvil (1 s blocks). ``full``: one transaction per payment takes about two
    minutes while the batched modes settle within the first few blocks. ``quick`` (400
    payments, measured): single takes about 11 s, each batched mode settles all in one block."""
    n = 400
    if shape == "full":
        single = [1.0 + 120.0 * i / n for i in range(n)]
        aggregate3 = [1.07 if i < 250 else 2.07 for i in range(n)]
        compact = [1.05 + (i // 150) for i in range(n)]
    else:
        single = [0.97 + 10.15 * i / n for i in range(n)]
        aggregate3 = [0.90 + 0.06 * i / n for i in range(n)]
        compact = [1.075 + 0.015 * i / n for i in range(n)]
    return [
        _settlement_run("single", single, 61_000.0),
        _settlement_run("aggregate3", aggregate3, 45_000.0),
        _settlement_run("compact", compact, 38_000.0),
    ]


def _results(*scenarios: str, shape: str = "full") -> dict[str, Any]:
    results: dict[str, Any] = {
        "profile": "quick",
        "command": "x402-engine bench --quick",
        "machine": "test",
        "started": "2024-01-01 00:00:00",
    }
    if "ingest" in scenarios:
        results["ingest"] = _ingest()
    if "settlement" in scenarios:
        results["settlement"] = _settlement(shape)
    if "scale" in scenarios:
        results["scale"] = {
            "live_authorizations": 1000,
            "dedup_bytes_per_entry": 120.0,
            "ledger_bytes_per_payment": 300.0,
            "engine_rss_bytes_per_pending": 2000.0,
            "restart_pending": 1000,
            "restart_s": 0.5,
        }
    return results


def _plot(results: dict[str, Any], out: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Figure]:
    """Run ``report.plots`` and keep every figure it saves, by file name."""
    saved: dict[str, Figure] = {}
    original = Figure.savefig

    def keep(fig: Figure, fname: Any, *args: Any, **kwargs: Any) -> None:
        saved[Path(fname).name] = fig
        original(fig, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    written = report.plots(results, out)
    assert sorted(written) == sorted(saved)
    for name in written:
        assert (out / name).read_bytes()[:8] == PNG
    return saved


def _panel(fig: Figure, word: str) -> Axes:
    (ax,) = [a for a in fig.axes if word in a.get_title().lower()]
    return ax


@pytest.mark.parametrize(
    "scenarios", [("settlement",), ("ingest",), ("ingest", "settlement")], ids="+".join
)
def test_one_panel_per_scenario_that_ran(
    scenarios: tuple[str, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    figs = _plot(_results(*scenarios), tmp_path, monkeypatch)
    for name in ("throughput.png", "latency_cdf.png"):
        axes = figs[name].axes
        assert len(axes) == len(scenarios), name
        for ax, scenario in zip(axes, scenarios, strict=True):
            assert scenario in ax.get_title().lower()
            assert ax.lines, f"{name}: empty {scenario} panel"
            assert ax.get_xlabel() and ax.get_ylabel(), f"{name}: unlabelled {scenario} axes"
    assert ("gas_per_payment.png" in figs) == ("settlement" in scenarios)


def test_no_throughput_or_latency_figure_without_their_scenarios(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _plot(_results("scale"), tmp_path, monkeypatch) == {}


@pytest.mark.parametrize("shape", ["full", "quick"])
def test_settlement_panel_shows_every_run_readably(
    shape: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = _results("settlement", shape=shape)
    fig = _plot(results, tmp_path, monkeypatch)["throughput.png"]
    fig.draw_without_rendering()
    ax = _panel(fig, "settlement")
    assert "second" in ax.get_xlabel().lower() and "payments" in ax.get_ylabel().lower()
    to_axes = ax.transData + ax.transAxes.inverted()
    lines = {str(line.get_label()).split(":")[0]: line for line in ax.lines}
    assert sorted(lines) == sorted(r["mode"] for r in results["settlement"])
    ends: dict[str, float] = {}
    for run in results["settlement"]:
        line = lines[run["mode"]]
        xs = [float(x) for x in np.asarray(line.get_xdata(), dtype=float)]
        assert all(math.isfinite(x) for x in xs)
        first, last = (float(to_axes.transform((x, 1.0))[0]) for x in (min(xs), max(xs)))
        assert 0.0 <= first <= last <= 1.0, f"{run['mode']} runs off the axis"
        # The run gets a readable share of the panel's width, not a spike at its left edge
        # (on a linear 0..120 s axis a run done in 2 s gets under 2% of it).
        assert last >= 0.15, f"{run['mode']} squeezed into the left {last:.1%} of the axis"
        ends[run["mode"]] = last
    # ... and the batched runs are visibly done well before one transaction per payment.
    assert all(ends["single"] - ends[m] >= 0.25 for m in ("aggregate3", "compact"))
    for run in results["settlement"]:
        ys = np.asarray(lines[run["mode"]].get_ydata(), dtype=float)
        assert ys.max() == run["settled"]  # cumulative: every settled payment, not rescaled
