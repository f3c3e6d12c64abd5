"""Several ``x402-engine serve`` processes on one PostgreSQL ledger, as an operator runs them
behind a load balancer; for the cluster tests and the ``cluster`` benchmark scenario.

Only 127.0.0.1: the instances, the database and the chain are this machine's.
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Protocol

import httpx
import msgspec
import trio

from engine.config import LedgerConfig, PolicyConfig, ServiceConfig, dump_config
from engine.dev.devchain import DevChain, engine_config, free_port

from .http_load import Answer, post
from .ingest import open_loop

ROOT = Path(__file__).resolve().parent.parent


class Endpoint(Protocol):
    """Where a load goes: an instance of a cluster, or any serve process."""

    port: int


class Instance:
    def __init__(self, name: str, url: str, process: trio.Process) -> None:
        self.name = name
        self.url = url
        self.process = process
        self.port = int(url.rsplit(":", 1)[1])

    def kill(self) -> None:
        """SIGKILL: no drain, no release: the cluster must take its work over."""
        self.process.send_signal(signal.SIGKILL)


@asynccontextmanager
async def cluster(
    dev: DevChain,
    dsn: str,
    count: int,
    workdir: Path,
    *,
    lease_s: float = 2.0,
    settlement: str = "deferred",
    policy: PolicyConfig | None = None,
    signers_per_instance: int = 1,
    log_level: str = "warning",
) -> AsyncIterator[list[Instance]]:
    """``count`` serve processes (instances ``i1``..), each on a port of its own, leasing
    ``signers_per_instance`` of the devchain's signers; yields them once all answer."""
    instances: list[Instance] = []
    workdir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - a directory, at start
    try:
        for i in range(1, count + 1):
            instances.append(
                await _start(
                    dev,
                    dsn,
                    f"i{i}",
                    workdir,
                    lease_s=lease_s,
                    settlement=settlement,
                    policy=policy,
                    signers_per_instance=signers_per_instance,
                    log_level=log_level,
                )
            )
        yield instances
    finally:
        for instance in instances:
            if instance.process.returncode is None:
                instance.process.terminate()
        with trio.move_on_after(30):
            for instance in instances:
                await instance.process.wait()
        for instance in instances:
            if instance.process.returncode is None:
                instance.process.kill()


async def _start(
    dev: DevChain,
    dsn: str,
    name: str,
    workdir: Path,
    *,
    lease_s: float,
    settlement: str,
    policy: PolicyConfig | None,
    signers_per_instance: int,
    log_level: str,
) -> Instance:
    config, env = engine_config(
        dev, ":unused:", policy=policy, signers_per_instance=signers_per_instance
    )
    port = free_port()
    config = msgspec.structs.replace(
        config,
        ledger=LedgerConfig(backend="postgres", instance_name=name, lease_s=lease_s),
        service=ServiceConfig(port=port, settlement=settlement),  # type: ignore[arg-type]
    )
    env["X402_LEDGER_DSN"] = dsn
    config_path, env_path = workdir / f"{name}.toml", workdir / f"{name}.env"
    config_path.write_bytes(dump_config(config))
    env_path.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    log = open(workdir / f"{name}.log", "ab")  # noqa: SIM115, ASYNC230 - tiny, the child's
    process = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "engine.cli",
            "--log-level",
            log_level,
            "serve",
            "--config",
            str(config_path),
            "--env-file",
            str(env_path),
        ],
        cwd=ROOT,
        stdout=log,
        stderr=log,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    log.close()
    url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(timeout=10) as client:
        with trio.fail_after(60):
            while True:
                if process.returncode is not None:
                    tail = (workdir / f"{name}.log").read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"instance {name} exited: {tail}")
                try:
                    if (await client.get(url + "/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await trio.sleep(0.1)
    return Instance(name, url, process)


async def post_spread(
    instances: Sequence[Endpoint],
    path: str,
    bodies: Sequence[bytes],
    concurrency: int,
) -> list[Answer | None]:
    """POST each body to the next instance in turn (a round-robin load balancer), at most
    ``concurrency`` at once; None where the instance did not answer (it was killed)."""
    answers: list[Answer | None] = [None] * len(bodies)
    limiter = trio.Semaphore(concurrency)
    targets = itertools.cycle(instances)

    async def one(i: int, body: bytes, instance: Endpoint) -> None:
        async with limiter:
            try:
                answers[i] = await post("127.0.0.1", instance.port, path, body, timeout_s=120)
            except (OSError, trio.BrokenResourceError, IndexError, ValueError):
                answers[i] = None  # connection refused or cut: no answer

    async with trio.open_nursery() as nursery:
        for i, body in enumerate(bodies):
            nursery.start_soon(one, i, body, next(targets))
    return answers


def settle_body(payload: object, requirements: object) -> bytes:
    return msgspec.json.encode(
        {"x402Version": 2, "paymentPayload": payload, "paymentRequirements": requirements}
    )


async def post_open_loop(
    instances: Sequence[Endpoint], path: str, bodies: Sequence[bytes], rate_per_s: float
) -> list[float]:
    """Offer requests at a fixed rate whatever the answers (round-robin over the instances);
    latency counts from when each was due, so queueing shows."""
    latencies: list[float] = []

    async def one(i: int, due: float) -> None:
        instance = instances[i % len(instances)]
        await post("127.0.0.1", instance.port, path, bodies[i], timeout_s=120)
        latencies.append(trio.current_time() - due)

    await open_loop(len(bodies), rate_per_s, one)
    return latencies
