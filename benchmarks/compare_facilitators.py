"""Our facilitator against the official x402 SDK's, on one anvil, with the same load; and the
SDK's facilitator with our mechanism in it.

    python -m benchmarks.compare_facilitators [--payments 2000] [--concurrency 500]
        [--payers 500] [--block-time 1] [--order ours,sdk,sdk-engine] [--json FILE]
        [--workdir DIR]

One anvil (``--block-time`` s blocks) with a devchain (token, batcher, ``--payers`` funded
payers). Each facilitator runs as its own process on it, one at a time (started before its run,
stopped after, so the idle one takes no CPU from the other on a small machine):

- ours: ``x402-engine serve`` with the devchain's configuration (``confirmed`` settlement, the
  default batching policy);
- the SDK's (``sdk``): ``python -m benchmarks.sdk_facilitator`` (its ``x402FacilitatorSync`` and
  exact EVM mechanism behind a stdlib HTTP server), sending from anvil's account 0;
- the SDK's with ours inside (``sdk-engine``): ``python -m benchmarks.sdk_facilitator
  --engine-config``, the same ``x402FacilitatorSync`` behind the same HTTP server, with
  ``register_batched_exact_evm`` (``engine/integrations/x402_sdk.py``) in place of the SDK's
  exact EVM mechanism, on the devchain's configuration and signer keys but a ledger of its own
  (``engine-sdk.toml``: ``engine.toml`` with another ``[ledger] path``), so that its engine
  does not find the ``ours`` run's payments.

``--order`` names the runs, in the order they run (any of the three, each once); the table lists
them as ours, sdk, sdk-engine. The load is the same for each, and is what a user would run:
``x402-engine pay --facilitator URL --devchain DIR --count N --concurrency C --amount A --json
FILE`` as a subprocess, a closed loop of C workers, each signing a fresh EIP-3009 payment
(random nonce) from the same payer keys and sending ``/verify`` then ``/settle``. Transactions
and gas come from the chain (the token's ``AuthorizationUsed`` logs), so every facilitator is
measured the same way.

Prints the exact commands, then a markdown table and the ratios (ours ÷ SDK; SDK with our
mechanism ÷ SDK); ``--json`` writes everything.
Everything listens on 127.0.0.1 only; every process started here is stopped on exit.
"""

from __future__ import annotations

import argparse
import datetime
import math
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import msgspec
import trio

from engine.config import LedgerConfig, ServiceConfig, dump_config, load_config
from engine.dev.devchain import Anvil, DevChain, engine_config, free_port, setup_devchain

from .sdk_facilitator import DEFAULT_KEY_ENV, sdk_facilitator_key

ROOT = Path(__file__).resolve().parent.parent
NAMES = {
    "ours": "x402-engine (ours)",
    "sdk": "x402 SDK facilitator",
    "sdk-engine": "x402 SDK facilitator + x402-engine mechanism",
}
ROW_ORDER = list(NAMES)  # the table's order, whatever ran first
AMOUNT = 1000  # base units per payment ($0.001 of a 6-decimal token)


class Run(msgspec.Struct):
    """One facilitator's run: what was run, and what ``x402-engine pay`` reported."""

    facilitator: str
    serve_command: list[str]
    pay_command: list[str]
    pay_exit_code: int
    pay_wall_s: float  # the pay command, start to exit (signing, load, chain look-up)
    report: dict[str, Any]  # the pay command's --json document


# ------------------------------------------------------------------------------ processes


def _engine_command() -> list[str]:
    """``x402-engine`` as installed next to this interpreter, else through the module."""
    script = Path(sys.executable).parent / "x402-engine"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "engine.cli"]


def _wait_http(url: str, process: subprocess.Popen[bytes], log: Path, patience_s: float) -> None:
    """Until ``url`` answers 200; fails with the process's log if it exits or never answers."""
    deadline = time.monotonic() + patience_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode}:\n{_tail(log)}")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer in {patience_s:g} s:\n{_tail(log)}")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@contextmanager
def _process(command: list[str], log: Path, ready_url: str) -> Iterator[None]:
    """``command`` as a child process (output to ``log``) until the block ends; ready once
    ``ready_url`` answers 200. Stopped with SIGTERM (then SIGKILL after 30 s)."""
    with open(log, "ab") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        try:
            _wait_http(ready_url, process, log, patience_s=60)
            yield
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


# ---------------------------------------------------------------------------- the setup


def _prepare(workdir: Path, anvil: Anvil, payers: int) -> tuple[DevChain, Path, Path, Path]:
    """The devchain on ``anvil``; its directory (for ``pay --devchain``), our configuration
    and environment files, and the SDK facilitator's environment file."""
    dev = trio.run(lambda: setup_devchain(anvil.url, payers=payers))
    devdir = workdir / "devchain"
    devdir.mkdir(parents=True, exist_ok=True)
    (devdir / "devchain.json").write_bytes(msgspec.json.format(msgspec.json.encode(dev)))
    (devdir / "devchain.json").chmod(0o600)
    config, env = engine_config(dev, str(workdir / "ledger.duckdb"))
    config = msgspec.structs.replace(config, service=ServiceConfig(port=free_port()))
    config_path = workdir / "engine.toml"
    config_path.write_bytes(dump_config(config))
    env_path = workdir / "signer.env"
    env_path.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    env_path.chmod(0o600)
    sdk_env = workdir / "sdk.env"
    sdk_env.write_text(f"{DEFAULT_KEY_ENV}={sdk_facilitator_key(dev)}\n")
    sdk_env.chmod(0o600)
    return dev, devdir, config_path, env_path


def _sdk_engine_config(workdir: Path, config_path: Path) -> Path:
    """``engine.toml`` with a ledger of its own, for the SDK facilitator with our mechanism:
    same chain, signers and policy as ``x402-engine serve``, none of its payments."""
    config = load_config(config_path)
    ledger = msgspec.structs.replace(config.ledger, path=str(workdir / "ledger-sdk.duckdb"))
    assert isinstance(ledger, LedgerConfig)
    path = workdir / "engine-sdk.toml"
    path.write_bytes(dump_config(msgspec.structs.replace(config, ledger=ledger)))
    return path


def _serve_commands(
    dev: DevChain, workdir: Path, config_path: Path, env_path: Path
) -> dict[str, tuple[list[str], str]]:
    """Each facilitator's command line and base URL."""
    port = int(tomllib.loads(config_path.read_text())["service"]["port"])
    sdk_port, sdk_engine_port = free_port(), free_port()
    ours = [*_engine_command(), "serve", "--config", str(config_path), "--env-file", str(env_path)]
    sdk = [
        sys.executable,
        "-m",
        "benchmarks.sdk_facilitator",
        "--rpc-url",
        dev.rpc_url,
        "--chain-id",
        str(dev.chain_id),
        "--key-env",
        DEFAULT_KEY_ENV,
        "--env-file",
        str(workdir / "sdk.env"),
        "--bind",
        f"127.0.0.1:{sdk_port}",
    ]
    sdk_engine = [
        sys.executable,
        "-m",
        "benchmarks.sdk_facilitator",
        "--engine-config",
        str(_sdk_engine_config(workdir, config_path)),
        "--env-file",
        str(env_path),
        "--bind",
        f"127.0.0.1:{sdk_engine_port}",
    ]
    return {
        "ours": (ours, f"http://127.0.0.1:{port}"),
        "sdk": (sdk, f"http://127.0.0.1:{sdk_port}"),
        "sdk-engine": (sdk_engine, f"http://127.0.0.1:{sdk_engine_port}"),
    }


# ------------------------------------------------------------------------------ the load


def _pay_command(url: str, devdir: Path, out: Path, args: argparse.Namespace) -> list[str]:
    return [
        *_engine_command(),
        "pay",
        "--facilitator",
        url,
        "--devchain",
        str(devdir),
        "--payers",
        str(args.payers),
        "--count",
        str(args.payments),
        "--concurrency",
        str(args.concurrency),
        "--amount",
        str(AMOUNT),
        "--json",
        str(out),
    ]


def _run_one(
    name: str, serve: tuple[list[str], str], devdir: Path, workdir: Path, args: argparse.Namespace
) -> Run:
    command, url = serve
    ready = url + ("/healthz" if name == "ours" else "/supported")
    out = workdir / f"pay-{name}.json"
    pay = _pay_command(url, devdir, out, args)
    print(f"\n## {NAMES[name]}", flush=True)
    print(f"serve: {shlex.join(command)}", flush=True)
    with _process(command, workdir / f"{name}.log", ready):
        print(f"pay:   {shlex.join(pay)}", flush=True)
        start = time.perf_counter()
        code = subprocess.run(pay, cwd=ROOT, check=False).returncode
        wall = time.perf_counter() - start
    if not out.exists():
        raise RuntimeError(
            f"{name}: the pay command wrote no report (exit code {code});"
            f" the facilitator's log:\n{_tail(workdir / f'{name}.log')}"
        )
    report = msgspec.json.decode(out.read_bytes())
    return Run(NAMES[name], command, pay, code, wall, report)


# ----------------------------------------------------------------------------- the table


def _ms(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:,.0f} ms"


def _row(run: Run) -> str:
    s = run.report["summary"]
    chain = s.get("chain") or {}
    gas = run.report.get("gas_per_payment")
    cells = [
        run.facilitator,
        f"{s['settled']:,} / {s['sent']:,}",
        f"{run.report['settled_per_s']:,.1f}",
        _ms(s.get("p50_ms")),
        _ms(s.get("p99_ms")),
        f"{chain.get('transactions', 0):,}",
        f"{gas:,}" if gas else "-",
    ]
    return "| " + " | ".join(cells) + " |"


def _speed_and_gas(run: Run | None, sdk: Run | None) -> tuple[float | None, float | None]:
    """``run``'s settled/s over the SDK's, and how much less gas per payment in percent."""
    if run is None or sdk is None:
        return None, None
    rate, rate_sdk = run.report["settled_per_s"], sdk.report["settled_per_s"]
    gas, gas_sdk = run.report.get("gas_per_payment"), sdk.report.get("gas_per_payment")
    return (
        rate / rate_sdk if rate_sdk else None,
        (1 - gas / gas_sdk) * 100 if gas and gas_sdk else None,
    )


def _ratios(runs: dict[str, Run]) -> dict[str, float | None]:
    """Against the SDK's own facilitator: ours, and the SDK's with our mechanism (None where
    a run is missing)."""
    sdk = runs.get("sdk")
    speed, gas = _speed_and_gas(runs.get("ours"), sdk)
    speed_engine, gas_engine = _speed_and_gas(runs.get("sdk-engine"), sdk)
    return {
        "settled_per_s_ours_over_sdk": speed,
        "gas_per_payment_less_pct": gas,
        "settled_per_s_sdk_engine_over_sdk": speed_engine,
        "gas_per_payment_sdk_engine_less_pct": gas_engine,
    }


def _ratio_lines(label: str, speed: float | None, gas: float | None) -> list[str]:
    return [
        f"settled/s, {label} ÷ SDK: {speed:,.1f}×" if speed else f"settled/s, {label} ÷ SDK: -",
        f"gas per payment, {label} vs SDK: {gas:.1f}% less"
        if gas is not None
        else f"gas per payment, {label} vs SDK: -",
    ]


def _table(runs: list[Run], ratios: dict[str, float | None]) -> list[str]:
    lines = [
        "| facilitator | settled | settled/s | latency p50 | p99 | transactions"
        " | gas per payment |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *(_row(run) for run in runs),
        "",
    ]
    ran = {run.facilitator for run in runs}
    if NAMES["sdk"] in ran:
        if NAMES["ours"] in ran:
            speed, gas = ratios["settled_per_s_ours_over_sdk"], ratios["gas_per_payment_less_pct"]
            lines += _ratio_lines("ours", speed, gas)
        if NAMES["sdk-engine"] in ran:
            speed = ratios["settled_per_s_sdk_engine_over_sdk"]
            gas = ratios["gas_per_payment_sdk_engine_less_pct"]
            lines += _ratio_lines("SDK + x402-engine mechanism", speed, gas)
    for run in runs:
        s = run.report["summary"]
        for title in ("rejected", "errors"):
            if s[title]:
                reasons = ", ".join(f"{k}: {v:,}" for k, v in sorted(s[title].items()))
                lines.append(f"{run.facilitator} {title}: {reasons}")
    return lines


# ------------------------------------------------------------------------------- running


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # so that every finally runs and the children are stopped


def _parse_order(text: str) -> list[str]:
    """``--order``: names of runs, comma-separated, each at most once."""
    order = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in order if name not in NAMES]
    if unknown or not order or len(set(order)) != len(order):
        raise argparse.ArgumentTypeError(
            f"wants distinct names among {','.join(NAMES)} (e.g. ours,sdk,sdk-engine), not {text!r}"
        )
    return order


def compare(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    order: list[str] = args.order
    started = datetime.datetime.now(datetime.UTC)
    with Anvil(block_time_s=args.block_time, log_path=workdir / "anvil.log") as anvil:
        print(f"anvil {anvil.url}, {args.block_time:g} s blocks; workdir {workdir}")
        dev, devdir, config_path, env_path = _prepare(workdir, anvil, args.payers)
        serves = _serve_commands(dev, workdir, config_path, env_path)
        runs = {name: _run_one(name, serves[name], devdir, workdir, args) for name in order}
    ratios = _ratios(runs)
    ordered = [runs[name] for name in ROW_ORDER if name in runs]
    print(
        f"\n# {args.payments:,} payments, {args.concurrency} in flight, order {','.join(order)}\n"
    )
    for line in _table(ordered, ratios):
        print(line)
    return {
        "date": started.isoformat(timespec="seconds"),
        "anvil": {"block_time_s": args.block_time, "chain_id": dev.chain_id},
        "workload": {
            "payments": args.payments,
            "concurrency": args.concurrency,
            "payers": args.payers,
            "amount": AMOUNT,
            "loop": "closed",
            "verify_then_settle": True,
        },
        "order": order,
        "runs": [msgspec.to_builtins(run) for run in ordered],
        "ratios": ratios,
        "table": _table(ordered, ratios),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.compare_facilitators",
        description="Our facilitator vs the official x402 SDK's (and the SDK's with our "
        "mechanism), same load on one anvil.",
    )
    parser.add_argument("--payments", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=500)
    parser.add_argument("--payers", type=int, default=500)
    parser.add_argument("--block-time", type=float, default=1.0)
    parser.add_argument(
        "--order",
        type=_parse_order,
        default=_parse_order("ours,sdk,sdk-engine"),
        help="which facilitators run, in this order (default ours,sdk,sdk-engine; any of them)",
    )
    parser.add_argument("--json", default=None, help="write everything here")
    parser.add_argument(
        "--workdir", default=None, help="keep configs and logs here (default: a temp dir)"
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _on_sigterm)
    with ExitStack() as stack:
        if args.workdir:
            workdir = Path(args.workdir).resolve()
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(tempfile.mkdtemp(prefix="x402-compare-"))
            stack.callback(shutil.rmtree, workdir, True)
        start = time.perf_counter()
        result = compare(args, workdir)
        result["wall_s"] = time.perf_counter() - start
        print(f"\nwall time {result['wall_s']:,.0f} s")
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(msgspec.json.format(msgspec.json.encode(result)))


if __name__ == "__main__":
    main()
