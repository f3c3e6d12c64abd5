"""A lean HTTP/1.1 load generator for POSTing many pre-built bodies at once under trio.

One connection per request (``Connection: close``), no client-side pool: httpx's pool spends
more CPU than the server under a thousand concurrent requests, which would measure the client.
Only for 127.0.0.1 targets.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import msgspec
import trio

from engine.config import EngineConfig, dump_config


class Answer(msgspec.Struct):
    status: int
    body: bytes
    latency_s: float


async def post(host: str, port: int, path: str, body: bytes, timeout_s: float = 300) -> Answer:
    assert host in ("127.0.0.1", "localhost", "::1"), "load tests target this machine only"
    request = (
        f"POST {path} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body
    start = time.perf_counter()
    with trio.fail_after(timeout_s):
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            await stream.send_all(request)
            chunks = []
            while True:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                chunks.append(chunk)
    raw = b"".join(chunks)
    head, _, payload = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return Answer(status, payload, time.perf_counter() - start)


async def post_all(url: str, path: str, bodies: list[bytes], concurrency: int) -> list[Answer]:
    """POST every body, at most ``concurrency`` at a time; answers in the order of ``bodies``."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    answers: list[Answer | None] = [None] * len(bodies)
    limiter = trio.Semaphore(concurrency)

    async def one(i: int, body: bytes) -> None:
        async with limiter:
            answers[i] = await post(host, port, path, body)

    async with trio.open_nursery() as nursery:
        for i, body in enumerate(bodies):
            nursery.start_soon(one, i, body)
    return [a for a in answers if a is not None]


@asynccontextmanager
async def serving(
    config: EngineConfig, env: dict[str, str], workdir: Path, name: str
) -> AsyncIterator[str]:
    """``x402-engine serve`` as its own process, as in production, on ``config``'s
    [service] port; yields its URL once /healthz answers, stops it on exit."""
    config_path = workdir / f"{name}.toml"
    env_path = workdir / f"{name}.env"
    config_path.write_bytes(dump_config(config))
    env_path.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    command = [sys.executable, "-m", "engine.cli", "serve", "--config", str(config_path)]
    server = await trio.lowlevel.open_process(
        [*command, "--env-file", str(env_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{config.service.port}"
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            with trio.fail_after(60):
                while True:
                    try:
                        if (await client.get(url + "/healthz")).status_code == 200:
                            break
                    except httpx.TransportError:
                        await trio.sleep(0.1)
        yield url
    finally:
        server.terminate()
        with trio.move_on_after(30):
            await server.wait()
