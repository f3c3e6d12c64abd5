"""A facilitator service on a fresh anvil, run in a background thread, for tests whose clients
are synchronous or asyncio-based (the official SDK) or hypothesis-driven."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import trio

from engine.chain.rpc import Rpc
from engine.config import EngineConfig, PolicyConfig, ServiceConfig
from engine.dev.devchain import Anvil, DevChain, engine_config, setup_devchain
from engine.service.app import run_service

from .chain import balances

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent


class RunningService:
    def __init__(self, url: str, dev: DevChain, config: EngineConfig, anvil: Anvil) -> None:
        self.url = url
        self.dev = dev
        self.config = config
        self.anvil = anvil


@contextmanager
def running_service(
    tmp: Path,
    *,
    payers: int = 20,
    service: ServiceConfig | None = None,
    environ: dict[str, str] | None = None,
    policy: PolicyConfig | None = None,
    **chain_overrides: Any,
) -> Iterator[RunningService]:
    with Anvil() as anvil:
        dev = trio.run(lambda: setup_devchain(anvil.url, payers=payers))
        config, env = engine_config(
            dev,
            str(tmp / "ledger.duckdb"),
            policy=policy or PolicyConfig(max_wait_ms=200),
            **chain_overrides,
        )
        config = msgspec.structs.replace(config, service=service or ServiceConfig())
        env = {**env, **(environ or {})}
        started = threading.Event()
        stop_token: list[trio.lowlevel.TrioToken] = []
        stop_event: list[trio.Event] = []
        addresses: list[str] = []
        errors: list[BaseException] = []

        async def main() -> None:
            stop = trio.Event()
            stop_event.append(stop)
            stop_token.append(trio.lowlevel.current_trio_token())

            async def serve(task_status: trio.TaskStatus[list[str]]) -> None:
                await run_service(
                    config,
                    environ=env,
                    bind="127.0.0.1:0",
                    task_status=task_status,
                    shutdown_trigger=stop.wait,
                )

            async with trio.open_nursery() as nursery:
                addresses.extend(await nursery.start(serve))
                started.set()

        def thread_main() -> None:
            try:
                trio.run(main)
            except BaseException as exc:
                errors.append(exc)
            finally:
                started.set()

        thread = threading.Thread(target=thread_main, daemon=True)
        thread.start()
        started.wait(60)
        if errors or not addresses:
            raise RuntimeError(f"service did not start: {errors}")
        url = addresses[0].replace("0.0.0.0", "127.0.0.1")
        try:
            yield RunningService(url, dev, config, anvil)
        finally:
            trio.from_thread.run_sync(stop_event[0].set, trio_token=stop_token[0])
            thread.join(30)
            if errors:
                raise errors[0]


@contextmanager
def sdk_resource_server(svc: RunningService) -> Iterator[str]:
    """The SDK's Flask resource server (tests/sdk_resource_server.py) paying the devchain's
    payee through our facilitator; yields its URL."""
    with sdk_resource_server_at(svc.url, svc.dev.token, svc.dev.payee) as url:
        yield url


@contextmanager
def sdk_resource_server_at(facilitator_url: str, token: str, pay_to: str) -> Iterator[str]:
    """The SDK's Flask resource server selling GET /paid for 1,000 base units of ``token`` to
    ``pay_to``, through the facilitator at ``facilitator_url``; yields its URL."""
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.sdk_resource_server", facilitator_url, token, pay_to],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        assert line.startswith("READY"), (line, server.stderr.read() if server.stderr else "")
        yield line.split()[1]
    finally:
        server.kill()
        server.wait()


def on_chain(svc: RunningService, work: Callable[[Rpc], Awaitable[T]]) -> T:
    """``work(rpc)`` against the service's anvil, from synchronous test code."""

    async def run() -> T:
        rpc = Rpc(svc.anvil.url)
        try:
            return await work(rpc)
        finally:
            await rpc.aclose()

    return trio.run(run)


def token_balances(svc: RunningService, owners: list[str]) -> list[int]:
    """The devchain token's balances of ``owners``, read from the service's anvil."""
    return list(on_chain(svc, lambda rpc: balances(rpc, svc.dev.token, owners)))
