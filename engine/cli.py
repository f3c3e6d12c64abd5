"""x402-engine: a batch settlement engine for x402 payments (EIP-3009 and Permit2 on EVM
chains). It verifies signed payments, records them durably, and settles many in one transaction.

A first hour on a local chain (in a checkout, after make setup and . .venv/bin/activate):

    x402-engine devchain --detach          # anvil, token, batcher, funded payers
    x402-engine serve --config devchain/engine.toml --env-file devchain/signer.env &
    x402-engine pay --facilitator http://127.0.0.1:4021
    x402-engine report --config devchain/engine.toml

Every command has its own --help; the README covers configuration and operation.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import trio
from rich.console import Console

from .config import dump_config, read_env_file
from .dev.devchain import Anvil, engine_config, setup_devchain

T = TypeVar("T")


def _devchain(args: argparse.Namespace) -> int:
    """A local chain to try the engine on: anvil with the token, the batchers and funded payers,
    and the files ``serve`` and ``pay`` read. In the foreground until Ctrl-C, or ``--detach``ed
    (stopped later with ``--stop``)."""
    from .config import ConfigError

    console = Console(highlight=False, soft_wrap=True)
    out = Path(args.out)
    if args.stop:
        return _devchain_stop(out, console)
    if _port_taken(args.port):
        raise ConfigError(
            f"127.0.0.1:{args.port} is taken (a devchain already running? x402-engine devchain"
            " --stop, or choose --port)"
        )
    out.mkdir(parents=True, exist_ok=True)
    for line in _set_old_ledger_aside(out):
        console.print(line)
    anvil = Anvil(
        args.port, block_time_s=args.block_time, log_path=out / "anvil.log", detach=args.detach
    )
    keep_running = False
    try:
        dev = trio.run(lambda: setup_devchain(anvil.url, payers=args.payers))
        config, env = engine_config(dev, str(out / "ledger.duckdb"))
        # Each file appears whole (written aside, then renamed), keys readable by us only.
        _write_atomically(out / "signer.env", "".join(f"{k}={v}\n" for k, v in env.items()))
        _write_atomically(out / "devchain.json", msgspec.json.format(msgspec.json.encode(dev)))
        _write_atomically(out / "engine.toml", dump_config(config))
        console.print(f"anvil      {anvil.url} (chain id {dev.chain_id})")
        console.print(f"token      {dev.token}  ({dev.token_name} v{dev.token_version})")
        console.print(f"batcher    {dev.batcher}")
        console.print(f"payee      {dev.payee}")
        console.print(f"payers     {len(dev.payer_keys)} funded (keys in {out / 'devchain.json'})")
        console.print(f"config     {out / 'engine.toml'}; signer keys in {out / 'signer.env'}")
        if args.exit:
            return 0
        if args.detach:
            (out / "anvil.pid").write_text(f"{anvil.process.pid}\n")
            keep_running = True
            console.print(
                f"anvil runs in the background (pid {anvil.process.pid}); stop it with"
                f" x402-engine devchain --stop --out {out}"
            )
            return 0
        console.print("running; Ctrl-C stops anvil")
        stop = False

        def _stop(*_: object) -> None:
            nonlocal stop
            stop = True

        signal.signal(signal.SIGTERM, _stop)
        try:
            while not stop and anvil.process.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        return 0
    finally:
        if not keep_running:
            anvil.stop()


def _port_taken(port: int) -> bool:
    import socket

    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _write_atomically(path: Path, data: str | bytes) -> None:
    aside = path.with_name(path.name + ".partial")
    raw = data.encode() if isinstance(data, str) else data
    fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(raw)
    os.replace(aside, path)


def _set_old_ledger_aside(out: Path) -> list[str]:
    """A new devchain is a new chain: the previous one's ledger (bound to the old chain; the
    engine would refuse it) moves to ``old/`` in the same directory, never deleted."""
    found = sorted(out.glob("ledger.duckdb*"))
    if not found:
        return []
    aside = out / "old" / time.strftime("%Y%m%d-%H%M%S")
    aside.mkdir(parents=True, exist_ok=True)
    for path in found:
        path.rename(aside / path.name)
    return [f"ledger     the previous devchain's ledger moved to {aside}/"]


def _devchain_stop(out: Path, console: Console) -> int:
    from .config import ConfigError

    pid_file = out / "anvil.pid"
    if not pid_file.exists():
        raise ConfigError(f"no detached devchain in {out}/ (no anvil.pid)")
    try:
        pid = int(pid_file.read_text().strip())
    except ValueError:
        raise ConfigError(
            f"{pid_file} holds no process id: remove it, stop anvil by hand"
        ) from None
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            os.kill(pid, 0)  # raises once it is gone
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    pid_file.unlink()
    console.print(f"stopped anvil (pid {pid})")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .dev.demo import print_result, run_demo

    console = Console()
    result = trio.run(
        lambda: run_demo(
            payments=args.payments,
            payers=args.payers,
            value=args.value,
            concurrency=args.concurrency,
            block_time_s=args.block_time,
            mode=args.mode,
            ledger_dir=Path(args.ledger_dir) if args.ledger_dir else None,
            console=console,
            permit2_share=args.permit2_share,
        )
    )
    print_result(result, console)
    if args.json:
        Path(args.json).write_bytes(msgspec.json.format(msgspec.json.encode(result)))
    ok = (
        result.settled == result.accepted
        and result.payee_received == result.payee_expected
        and result.accepted == result.payments
    )
    if not ok:
        console.print("[red]demo: not every accepted payment settled[/red]")
    return 0 if ok else 1


SHUTDOWN_GRACE_S = 10.0  # in-flight requests get this long after SIGTERM/SIGINT


def _serve(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT, then drain: stop accepting, let requests in flight
    finish (acknowledgements always do: they are uncancellable), close the ledger cleanly and
    exit 0. A second signal stops at once."""
    from .config import ConfigError, load_config
    from .service.app import bearer_token, run_service

    config = load_config(args.config)
    environ = {**os.environ, **read_env_file(args.env_file)}
    console = Console(stderr=True)
    try:
        bearer_token(config.service, environ, args.bind)  # refuse before opening anything
    except ConfigError as exc:
        print(f"x402-engine serve: {exc}", file=sys.stderr)
        return 2

    async def main() -> None:
        stopping = trio.Event()
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:

                async def watch_signals() -> None:
                    async for signum in signals:
                        if stopping.is_set():
                            console.print("second signal: stopping now")
                            nursery.cancel_scope.cancel()
                            return
                        console.print(
                            f"{signal.Signals(signum).name}: draining (up to"
                            f" {SHUTDOWN_GRACE_S:g} s), then stopping"
                        )
                        stopping.set()
                        nursery.cancel_scope.deadline = trio.current_time() + SHUTDOWN_GRACE_S + 30

                async def serve(task_status: trio.TaskStatus[list[str]]) -> None:
                    await run_service(
                        config,
                        environ=environ,
                        bind=args.bind,
                        task_status=task_status,
                        tune_collector=True,
                        shutdown_trigger=stopping.wait,
                        graceful_timeout_s=SHUTDOWN_GRACE_S,
                    )
                    nursery.cancel_scope.cancel()  # served and drained: stop watching

                nursery.start_soon(watch_signals)
                addresses = await nursery.start(serve)
                console.print(f"x402 facilitator listening on {', '.join(addresses)}")

    trio.run(main)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    """Settle everything waiting now: through the running service (DuckDB ledger held by
    ``serve``), through every live instance (PostgreSQL), or by opening the engine itself."""
    from .config import load_config
    from .store.ledger import LedgerBusy

    config = load_config(args.config)
    environ = {**os.environ, **read_env_file(args.env_file)}
    if config.ledger.backend == "postgres":
        return _sweep_cluster(args, config, environ)
    try:
        return _sweep_local(args, config, environ)
    except BaseException as exc:
        if not isinstance(_single(exc), LedgerBusy):
            raise
    return _sweep_service(args, config, environ)  # serve holds the ledger: ask it


def _service_client(config: Any, environ: dict[str, str], url: str | None) -> Any:
    """An HTTP client for the running service's /admin endpoints (its bearer token, if any)."""
    import httpx

    from .service.app import effective_bind

    base = url or "http://" + effective_bind(config.service, None, environ)
    headers = {}
    if config.service.bearer_token_env and environ.get(config.service.bearer_token_env):
        headers["authorization"] = "Bearer " + environ[config.service.bearer_token_env]
    return httpx.Client(base_url=base, headers=headers, timeout=60)


def _sweep_service(args: argparse.Namespace, config: Any, environ: dict[str, str]) -> int:
    console = Console()
    with _service_client(config, environ, args.url) as client:
        answer = client.post("/admin/sweep", json={"payee": args.payee})
        answer.raise_for_status()
        console.print(f"{answer.json()['waiting']:,} payments waiting; settling (via the service)")

        def done() -> dict[str, Any] | None:
            progress: dict[str, Any] = client.get("/admin/progress").json()
            queued = sum(
                n
                for key, n in progress["queued"].items()
                if args.payee is None or key.split(":", 1)[1] in ("*", args.payee.lower())
            )
            return progress if queued == 0 and progress["inflightBatches"] == 0 else None

        progress = _poll_until(done, args.timeout)
    console.print(
        f"done: {progress['settled']:,} settled since the service started; failed:"
        f" {progress['failed'] or 'none'}"
    )
    return 0


def _sweep_cluster(args: argparse.Namespace, config: Any, environ: dict[str, str]) -> int:
    """PostgreSQL: a sweep command every live instance runs on its next heartbeat; then wait
    until nothing of the payee (or anyone) is open, cluster-wide."""
    from .cluster import dsn_from
    from .store.postgres import CommandProgress, command_progress, issue_command

    console = Console()
    dsn = dsn_from(config, environ)
    payee = args.payee.lower() if args.payee else None
    command = issue_command(dsn, "sweep", payee)

    def done() -> CommandProgress | None:
        progress = command_progress(dsn, command, config.ledger.lease_s, payee)
        return progress if progress.acked >= progress.live and progress.open == 0 else None

    progress = _poll_until(done, args.timeout)
    console.print(
        f"swept by {progress.acked} live instance(s): {progress.waiting:,} payments were waiting;"
        " none open now"
    )
    return 0


def _poll_until(done: Callable[[], T | None], timeout_s: float) -> T:
    """``done()`` every half second until it answers; TimeoutError (one line from main) once
    ``timeout_s`` passed."""
    deadline = time.monotonic() + timeout_s
    while (answer := done()) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"not finished within {timeout_s:g} s (--timeout)")
        time.sleep(0.5)
    return answer


def _sweep_local(args: argparse.Namespace, config: Any, environ: dict[str, str]) -> int:
    """Open the engine on its ledger, settle everything waiting now, show progress, report."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from .engine import Engine

    console = Console()

    async def main() -> int:
        async with Engine.open(config, environ=environ) as engine:
            before = engine.statistics()
            waiting = engine.settle_now(args.payee)
            console.print(f"{waiting:,} payments waiting; {before.pending:,} not yet final")
            columns = (BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
            with Progress(*columns, console=console) as progress:
                task = progress.add_task("sweep", total=before.pending)
                with trio.fail_after(args.timeout):
                    while True:
                        now = engine.statistics()
                        progress.update(task, completed=before.pending - now.pending)
                        rest = sum(
                            n
                            for (_, payee), n in engine.payee_queue_depths().items()
                            if args.payee is None or payee in ("", args.payee.lower())
                        )
                        if rest == 0 and not any(engine.inflight_batches().values()):
                            break
                        await trio.sleep(0.5)
            after = engine.statistics()
        settled = after.settled - before.settled
        failed = {r: n - before.failed.get(r, 0) for r, n in after.failed.items()}
        failed = {r: n for r, n in failed.items() if n}
        txs = after.batches_mined - before.batches_mined
        gas = after.gas_used - before.gas_used
        console.print(
            f"settled {settled:,} in {txs:,} transactions"
            f" ({gas / max(1, after.items_in_mined_batches - before.items_in_mined_batches):,.0f}"
            f" gas per payment); failed: {failed or 'none'}"
        )
        return 0 if not failed else 1

    return trio.run(main)


def _report_source(args: argparse.Namespace) -> tuple[Any, str]:
    """What to report from: PostgreSQL straight (read-only, while instances serve), the DuckDB
    file when no engine holds it, else the running service that does."""
    from .cluster import dsn_from
    from .config import load_config
    from .store.ledger import Ledger, LedgerBusy

    config = load_config(args.config) if args.config else None
    environ = {**os.environ, **read_env_file(args.env_file)}
    if config is not None and config.ledger.backend == "postgres":
        from .store.postgres import PgReader

        return PgReader(dsn_from(config, environ)), f"PostgreSQL ({config.ledger.dsn_env})"
    path = config.ledger.path if config is not None else args.ledger
    if not Path(path).exists():
        raise SystemExit(f"no ledger at {path}")
    try:
        return Ledger(path), path  # replays the journal: acknowledged payments are all there
    except LedgerBusy:
        if config is None:
            raise
    client = _service_client(config, environ, args.url)
    return ServiceSource(client), f"{path} (through the service at {client.base_url})"


class ServiceSource:
    """Report SQL through a running service's ``/admin/query`` (it holds the DuckDB file)."""

    dialect = "duckdb"

    def __init__(self, client: Any) -> None:
        self._client = client

    def query_with_columns(
        self, sql: str, params: list[Any] | None = None
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        answer = self._client.post("/admin/query", json={"sql": sql, "params": params or []})
        if answer.status_code != 200:
            raise SystemExit(f"the service refused the query ({answer.status_code}): {answer.text}")
        doc = answer.json()
        rows = [tuple(_number(v) for v in row) for row in doc["rows"]]
        return doc["columns"], rows

    def close(self) -> None:
        self._client.close()


def _number(value: Any) -> Any:
    """Exact amounts come as digit strings (JSON numbers stop at 2^53)."""
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    return value


def _report(args: argparse.Namespace) -> int:
    from rich.table import Table

    from .store.report import build_report, chart, export, record_lines, table_width

    source, where = _report_source(args)
    try:
        columns, rows = build_report(source, args.by)
        cells = [[f"{v:,}" if isinstance(v, int) else str(v) for v in row] for row in rows]
        console = Console(highlight=False, soft_wrap=True)
        if table_width([columns, *cells]) <= console.width:
            table = Table(title=f"x402 ledger {where}, by {args.by}")
            for name in columns:
                table.add_column(name, justify="left" if name == args.by else "right")
            for row_cells in cells:
                table.add_row(*row_cells)
            console.print(table)
        else:  # too narrow for the table (13 columns want ~200): one block per group
            groups = f"{len(cells):,} group{'s' if len(cells) != 1 else ''}"
            console.print(f"x402 ledger, by {args.by}: {groups}")
            console.print(f"from {where}")
            for row_cells in cells:
                console.print("\n".join(record_lines(columns, row_cells, console.width)))
            if not cells:
                console.print("(no payments)")
        for target, fmt in ((args.csv, "csv"), (args.parquet, "parquet")):
            if target:
                export(source, args.by, Path(target), fmt)  # type: ignore[arg-type]
                Console().print(f"wrote {target}")
        if args.chart:
            chart(source, Path(args.chart), args.decimals)
            Console().print(f"wrote {args.chart}")
    finally:
        source.close()
    return 0


def _ledger_copy(args: argparse.Namespace) -> int:
    """Move a DuckDB ledger (journal included) into the configured PostgreSQL ledger."""
    import socket

    from .cluster import dsn_from
    from .config import ConfigError, load_config
    from .store.ledger import Ledger
    from .store.postgres import copy_from_duckdb

    config = load_config(args.config)
    if config.ledger.backend != "postgres":
        raise ConfigError('ledger copy moves into [ledger] backend = "postgres"')
    if not Path(args.source).exists():
        raise SystemExit(f"no ledger at {args.source}")
    source = Ledger(args.source)  # replays its journal: every acknowledged payment
    try:
        name = config.ledger.instance_name or socket.gethostname()
        dsn = dsn_from(config, {**os.environ, **read_env_file(args.env_file)})
        copied = copy_from_duckdb(dsn, source, name)
    except RuntimeError as exc:  # refused or a count mismatch: rolled back, nothing copied
        raise SystemExit(f"x402-engine ledger copy: {exc}") from None
    finally:
        source.close()
    print(", ".join(f"{n:,} {table}" for table, n in copied.items()))
    print(f"copied; an instance named {name!r} resumes the open work at its start")
    return 0


def _ledger_migrate(args: argparse.Namespace) -> int:
    """Apply the PostgreSQL schema migrations the database lacks."""
    from .cluster import dsn_from
    from .config import ConfigError, load_config
    from .store import pg_schema
    from .store.postgres import migrate

    config = load_config(args.config)
    if config.ledger.backend != "postgres":
        raise ConfigError('ledger migrate is for [ledger] backend = "postgres"')
    applied = migrate(dsn_from(config, {**os.environ, **read_env_file(args.env_file)}))
    if applied:
        print(f"applied migration(s) {', '.join(map(str, applied))}; schema at {pg_schema.CURRENT}")
    else:
        print(f"schema already at {pg_schema.CURRENT}")
    return 0


def _salvage_journal(args: argparse.Namespace) -> int:
    """Keep every intact frame of a damaged journal; set the damaged segments aside."""
    from .config import load_config
    from .store.ledger import Ledger

    path = args.ledger or load_config(args.config).ledger.path
    if not Path(path).exists() and not Path(path + ".journal").exists():
        raise SystemExit(f"no ledger at {path}")
    ledger = Ledger(path, salvage=True)
    try:
        report = ledger.salvaged
        assert report is not None
        print(
            f"{report.frames} intact frames, {report.rows} payments recovered into {path}"
            f" ({ledger.replayed} were not in the ledger yet); {report.damaged_bytes} damaged"
            f" bytes skipped"
        )
        for aside in report.set_aside:
            print(f"damaged segment kept at {aside}")
    finally:
        ledger.close()
    return 0


def _bench(args: argparse.Namespace) -> int:
    try:
        from benchmarks.bench import FULL, QUICK, SCENARIOS, run
    except ImportError as exc:  # installed without the repository's benchmarks/
        raise SystemExit(f"x402-engine bench needs the repository checkout: {exc}") from exc

    scenarios = args.scenario or list(SCENARIOS)
    profile = QUICK if args.quick else FULL
    if args.crawler_day:
        from benchmarks.crawler_day import Day

        try:
            crawlers, requests, sites = (int(x) for x in args.crawler_day.split("x"))
        except ValueError as exc:
            raise SystemExit(
                "--crawler-day takes CRAWLERSxREQUESTSxSITES, e.g. 100x1000x20"
            ) from exc
        profile = msgspec.structs.replace(profile, crawler_day=Day(crawlers, requests, sites))
    run(scenarios, profile, Path(args.out), Console())
    return 0


def _campaign(args: argparse.Namespace) -> int:
    """Seeded fault campaign against the in-process chain simulator."""
    from .sim.campaign import SeedReport, run

    if args.seed is not None:
        seeds = [args.seed]
    else:
        seeds = list(range(args.start, args.start + args.seeds))
    if args.log_level == "warning":  # the engine's own warnings are the faults being injected
        logging.getLogger("x402_engine").setLevel(logging.ERROR)
    failed: list[int] = []
    started = time.perf_counter()

    def show(r: SeedReport) -> None:
        status = "ok" if r.ok else "FAILED"
        print(
            f"seed {r.seed}: {status}: {r.accepted}/{r.payments} accepted, {r.settled} settled,"
            f" {r.failed} failed, {r.lives} lives, {r.reorgs} reorgs, {r.third_party}"
            f" third-party acts, {r.replacements} fee bumps ({r.wall_s:.1f} s)",
            flush=True,
        )
        for problem in r.problems:
            print(f"    {problem}", flush=True)
        if not r.ok:
            failed.append(r.seed)
            print(f"    replay: x402-engine campaign --seed {r.seed}", flush=True)

    reports = run(seeds, payments_max=args.payments, on_report=show)
    minutes = (time.perf_counter() - started) / 60
    print(
        f"{len(reports)} seeds, {len(failed)} failed ({len(reports) / max(minutes, 1e-9):.0f}"
        f" seeds per minute){': ' + ', '.join(map(str, failed)) if failed else ''}"
    )
    return 1 if failed else 0


def _pay(args: argparse.Namespace) -> int:
    """Sign and send x402 payments; one with its details, or a bounded load with a summary."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .chain.rpc import Rpc
    from .config import ConfigError
    from .dev import pay
    from .dev.paystats import Answer, Shape, chain_lines, summary_lines

    console = Console(stderr=True)  # progress and waiting
    out = Console(highlight=False, soft_wrap=True)  # what happened: lines never broken
    shape = Shape(args.count, args.duration, args.rate, args.concurrency)
    if shape.count is None and shape.duration_s is None:
        if shape.rate is not None or shape.concurrency > 1:
            raise ConfigError("a load needs --count or --duration: it is always bounded")
        shape = msgspec.structs.replace(shape, count=1)
    if problem := shape.problem():
        raise ConfigError(problem)
    single = shape.count == 1 and shape.rate is None
    if args.key_file:
        payers = pay.payers_from_key_file(args.key_file, args.rpc, args.payers)
    else:
        dev, dev_path = pay.load_devchain(args.devchain)  # read once: payers and price
        payers = pay.payers_from_devchain(dev, dev_path, args.rpc, args.payers)
    target_url = args.facilitator or args.resource
    headers = {}
    if args.bearer_env:
        token = os.environ.get(args.bearer_env)
        if not token:
            raise ConfigError(f"environment variable {args.bearer_env} (--bearer-env) is not set")
        headers["authorization"] = "Bearer " + token

    async def main() -> pay.PayRun:
        price = None
        if args.facilitator:
            if args.key_file:
                if not (args.asset and args.pay_to):
                    raise ConfigError("--key-file with --facilitator needs --asset and --pay-to")
                rpc = Rpc(payers.rpc_url)
                try:
                    chain_id = await rpc.chain_id()
                    price = await pay.token_price(
                        rpc, chain_id, args.asset, args.pay_to, args.amount
                    )
                finally:
                    await rpc.aclose()
            else:
                price = pay.devchain_price(dev, args.amount, args.pay_to)
        target = pay.Target(
            target_url,
            "facilitator" if args.facilitator else "resource",
            headers,
            verify=not args.settle_only,
        )
        progress = Progress(
            TextColumn("paying"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[tally]}"),
            TimeElapsedColumn(),
            console=console,
            disable=single,
        )
        task = progress.add_task("pay", total=shape.count, tally="")
        tally = {"ok": 0, "refused": 0, "errors": 0}

        def on_start(price: pay.Price, chain_id: int) -> None:
            if chain_id not in pay.LOCAL_CHAINS and not single and not args.real_funds:
                raise ConfigError(
                    f"a load on chain {chain_id} moves real funds: add --real-funds to proceed"
                )
            token = f"0x{price.domain.address.hex()}"
            out.print(f"token       {token} ({price.domain.name} v{price.domain.version})")
            out.print(f"network     {price.network}, x402 v{price.version}")
            out.print(f"amount      {price.amount:,} base units to 0x{price.pay_to.hex()}")
            out.print(f"payers      {payers.source}")
            progress.start()

        def on_answer(answer: Answer) -> None:
            key = {"settled": "ok", "accepted": "ok", "rejected": "refused"}.get(
                answer.verdict, "errors"
            )
            tally[key] += 1
            progress.update(
                task,
                advance=1,
                tally=f"{tally['ok']:,} ok, {tally['refused']:,} refused,"
                f" {tally['errors']:,} errors",
            )

        try:
            return await pay.pay(
                target,
                payers,
                shape,
                price=price,
                version=args.x402_version,
                network=args.network,
                patience_s=args.patience,
                wait_chain_s=args.wait,
                say=console.print,
                on_start=on_start,
                on_answer=on_answer,
            )
        finally:
            progress.stop()

    run = trio.run(main)
    if single:
        answer = run.answers[0]
        out.print(f"payer       {run.first_payer}")
        out.print(f"answer      {answer.verdict} in {answer.latency_s * 1000:,.0f} ms")
        if answer.reason:
            out.print(f"reason      {answer.reason}")
        if answer.transaction:
            out.print(f"transaction {answer.transaction}")
        if answer.settlement_id and args.facilitator:
            out.print(f"settlement  {answer.settlement_id}")
            base = args.facilitator.rstrip("/")
            out.print(f"look it up  curl -s {base}/settlements/{answer.settlement_id}")
        for line in chain_lines(run.summary):
            out.print(line)
    else:
        for line in summary_lines(run.summary):
            out.print(line)
    if args.json:
        Path(args.json).write_bytes(
            msgspec.json.format(
                msgspec.json.encode(
                    {
                        "target": target_url,
                        "shape": shape,
                        "summary": run.summary,
                        "settled_per_s": run.summary.settled_per_s,
                        "gas_per_payment": run.summary.chain and run.summary.chain.gas_per_payment,
                    }
                )
            )
        )
    missing = run.summary.chain.missing if run.summary.chain else 0
    return 0 if run.summary.successes == run.summary.sent and not missing else 1


def _engine_arguments(parser: argparse.ArgumentParser) -> None:
    """What every command that runs the engine needs: its configuration and secrets."""
    parser.add_argument("--config", required=True, help="engine TOML (see README)")
    parser.add_argument("--env-file", default=None, help="KEY=VALUE file, e.g. signer keys")


# Longer than our ~60-line rule on purpose: a flat table of the subcommands and their options,
# one block per command, is easier to scan than the same table split over functions.
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="x402-engine",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--log-level", default="warning", help="debug, info, warning, error")
    parser.add_argument("--log-file", default=None, help="default: standard error")
    sub = parser.add_subparsers(dest="command", required=True)

    dc = sub.add_parser(
        "devchain",
        help="start anvil, deploy token + batcher, fund payers, write engine.toml",
        description="A local chain to try the engine on: anvil on 127.0.0.1 with a USDC-like"
        " token, the batchers and funded payers; writes engine.toml, signer.env and"
        " devchain.json into --out. A previous devchain's ledger there is moved to old/.",
    )
    dc.add_argument("--port", type=int, default=8545, help="anvil's port (default 8545)")
    dc.add_argument("--payers", type=int, default=100, help="funded payers (default 100)")
    dc.add_argument(
        "--block-time", type=float, default=1.0, help="seconds; 0 = automine (default 1)"
    )
    dc.add_argument("--out", default="devchain", help="directory for config and keys")
    when = dc.add_mutually_exclusive_group()
    when.add_argument("--exit", action="store_true", help="set up, write files, stop anvil, exit")
    when.add_argument(
        "--detach", action="store_true", help="set up, leave anvil running in the background"
    )
    when.add_argument("--stop", action="store_true", help="stop a --detach-ed devchain")
    dc.set_defaults(func=_devchain)

    serve = sub.add_parser("serve", help="run the HTTP facilitator on the engine")
    _engine_arguments(serve)
    serve.add_argument(
        "--bind",
        default=None,
        help="host:port (default: $X402_ENGINE_BIND, else [service] host and port); beyond"
        " loopback only with a bearer token",
    )
    serve.set_defaults(func=_serve)

    sweep = sub.add_parser("sweep", help="settle every waiting payment now (end of day)")
    _engine_arguments(sweep)
    sweep.add_argument("--payee", default=None, help="only this payee's payments")
    sweep.add_argument("--timeout", type=float, default=3600.0, help="seconds")
    sweep.add_argument(
        "--url", default=None, help="the serving engine (default: [service] host and port)"
    )
    sweep.set_defaults(func=_sweep)

    report = sub.add_parser("report", help="counts, amounts, gas and fees from the ledger")
    source = report.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="engine TOML: report on its [ledger]")
    source.add_argument("--ledger", help="a DuckDB ledger file (not open in a running engine)")
    report.add_argument("--env-file", default=None, help="KEY=VALUE file, e.g. the ledger DSN")
    report.add_argument(
        "--url", default=None, help="the serving engine (default: [service] host and port)"
    )
    report.add_argument("--by", choices=["day", "payee", "payer", "status"], default="day")
    report.add_argument("--csv", default=None, help="also write the report as CSV here")
    report.add_argument("--parquet", default=None, help="also write the report as Parquet here")
    report.add_argument("--chart", default=None, help="PNG of accepted vs settled value")
    report.add_argument("--decimals", type=int, default=6, help="token decimals for the chart")
    report.set_defaults(func=_report)

    salvage = sub.add_parser(
        "salvage-journal", help="recover every intact frame of a damaged journal into the ledger"
    )
    salvage_source = salvage.add_mutually_exclusive_group(required=True)
    salvage_source.add_argument("--config", help="engine TOML: its [ledger] path")
    salvage_source.add_argument("--ledger", help="a ledger file (the engine stopped)")
    salvage.set_defaults(func=_salvage_journal)

    ledger = sub.add_parser("ledger", help="ledger administration (PostgreSQL schema, copy)")
    ledger_sub = ledger.add_subparsers(dest="ledger_command", required=True)
    migrate = ledger_sub.add_parser("migrate", help="apply PostgreSQL schema migrations")
    _engine_arguments(migrate)
    migrate.set_defaults(func=_ledger_migrate)
    copy = ledger_sub.add_parser(
        "copy", help="move a DuckDB ledger (journal included) into the PostgreSQL one"
    )
    _engine_arguments(copy)
    copy.add_argument("--from", dest="source", required=True, help="the DuckDB ledger file")
    copy.set_defaults(func=_ledger_copy)

    bench = sub.add_parser("bench", help="run the benchmark scenarios (see benchmarks/)")
    bench.add_argument("--quick", action="store_true", help="small sizes, about a minute")
    bench.add_argument(
        "--scenario",
        action="append",
        choices=["ingest", "settlement", "scale", "crawler-day", "cluster"],
        help="repeatable; default: all",
    )
    bench.add_argument("--out", default="bench-results", help="output directory")
    bench.add_argument(
        "--crawler-day", default=None, help="CRAWLERSxREQUESTSxSITES, e.g. 100x1000x20"
    )
    bench.set_defaults(func=_bench)

    campaign = sub.add_parser(
        "campaign", help="seeded fault campaign against the in-process chain simulator"
    )
    campaign.add_argument("--seeds", type=int, default=100, help="how many seeds (default 100)")
    campaign.add_argument("--start", type=int, default=0, help="first seed (default 0)")
    campaign.add_argument("--seed", type=int, default=None, help="replay this one seed")
    campaign.add_argument("--payments", type=int, default=40, help="most payments per seed")
    campaign.set_defaults(func=_campaign)

    pay = sub.add_parser(
        "pay",
        help="sign and send x402 payments to a facilitator or a resource server (one, or a load)",
        description="Sign x402 exact (EIP-3009) payments and send them to a facilitator"
        " (/verify, then /settle) or to a resource server (its 402, then the paid retry). With"
        " no --count, --duration or --rate: one payment, shown in detail. Otherwise a bounded"
        " load with a summary; the chain is then asked which payments landed, in how many"
        " transactions, for how much gas. Exit code 1 unless every payment succeeded.",
    )
    where = pay.add_mutually_exclusive_group(required=True)
    where.add_argument("--facilitator", metavar="URL", help="a facilitator's base URL")
    where.add_argument("--resource", metavar="URL", help="a paid resource's URL (expects 402)")
    who = pay.add_mutually_exclusive_group()
    who.add_argument(
        "--devchain", default="devchain", help="a devchain --out directory (default: devchain)"
    )
    who.add_argument("--key-file", default=None, help="payer keys, one 0x-hex key per line")
    pay.add_argument("--rpc", default=None, help="JSON-RPC URL (default: the devchain's)")
    pay.add_argument("--payers", type=int, default=None, help="use only the first N payers")
    pay.add_argument("--amount", type=int, default=1000, help="base units (default 1000)")
    pay.add_argument("--asset", default=None, help="token address (--key-file; else devchain's)")
    pay.add_argument("--pay-to", default=None, help="payee address (default: devchain's payee)")
    pay.add_argument("--x402-version", type=int, choices=[1, 2], default=2, help="default 2")
    pay.add_argument("--network", default=None, help="network name (default from /supported)")
    pay.add_argument("--count", type=int, default=None, help="payments (default 1)")
    pay.add_argument("--duration", type=float, default=None, help="seconds at most")
    pay.add_argument(
        "--rate", type=float, default=None, help="open loop: payments started per second"
    )
    pay.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="closed loop: workers; open loop: most in flight (default 1)",
    )
    pay.add_argument(
        "--settle-only", action="store_true", help="facilitator: skip /verify before /settle"
    )
    pay.add_argument(
        "--bearer-env", default=None, help="environment variable holding a bearer token"
    )
    pay.add_argument(
        "--patience", type=float, default=30.0, help="seconds to wait for the URL (default 30)"
    )
    pay.add_argument(
        "--wait",
        type=float,
        default=60.0,
        help="seconds to wait for accepted payments to show on chain (default 60)",
    )
    pay.add_argument(
        "--real-funds", action="store_true", help="allow a load on a chain that is not local"
    )
    pay.add_argument("--json", default=None, help="also write the summary here")
    pay.set_defaults(func=_pay)

    demo = sub.add_parser("demo", help="devchain + engine + a synthetic load of payments")
    demo.add_argument("--payments", type=int, default=5000)
    demo.add_argument("--payers", type=int, default=500)
    demo.add_argument("--value", type=int, default=1000, help="base units ($0.001 in USDC)")
    demo.add_argument("--concurrency", type=int, default=64)
    demo.add_argument("--block-time", type=float, default=1.0, help="seconds; 0 = automine")
    demo.add_argument("--mode", choices=["compact", "aggregate3"], default="compact")
    demo.add_argument(
        "--permit2-share",
        type=float,
        default=0.1,
        help="share of payers paying with Permit2 after a one-time approval (compact mode;"
        " default 0.1)",
    )
    demo.add_argument("--ledger-dir", default=None, help="default: a new temporary directory")
    demo.add_argument("--json", default=None, help="also write the results here")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        filename=args.log_file,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    import httpx
    import psycopg

    from .config import ConfigError
    from .model import ChainMismatch
    from .store.journal import JournalCorrupt
    from .store.ledger import LedgerBusy
    from .store.postgres import LeaseLost, SchemaMismatch, Superseded

    try:
        code: int = args.func(args)
    except BaseException as exc:
        leaf = _single(exc)
        if isinstance(leaf, ConfigError):  # the operator's input: one line, usage exit code
            print(f"x402-engine {args.command}: {leaf}", file=sys.stderr)
            return 2
        if isinstance(
            leaf,
            JournalCorrupt
            | LedgerBusy
            | SchemaMismatch
            | Superseded
            | LeaseLost
            | TimeoutError
            | ChainMismatch,
        ):
            print(f"x402-engine {args.command}: {leaf}", file=sys.stderr)
            return 1
        if isinstance(leaf, psycopg.OperationalError):
            said = " ".join(str(leaf).split())  # psycopg's hint comes on a line of its own
            print(f"x402-engine {args.command}: the ledger database: {said}", file=sys.stderr)
            return 1
        if isinstance(leaf, httpx.TransportError | httpx.HTTPStatusError):
            print(f"x402-engine {args.command}: the running service: {leaf}", file=sys.stderr)
            return 1
        raise
    return code


def _single(exc: BaseException) -> BaseException:
    """The one exception inside (nested) single-member exception groups, or ``exc``."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


if __name__ == "__main__":
    sys.exit(main())
