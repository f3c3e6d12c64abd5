"""``x402-engine serve``: the facilitator over HTTP, as a small ASGI app under Hypercorn's trio
worker (Hypercorn is the ASGI server that runs natively on trio, so the engine and the HTTP
server share one trio run, one thread and no asyncio)."""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from ..config import ConfigError, EngineConfig, ServiceConfig
from ..engine import Engine
from ..gctune import tuned_gc
from .facilitator import Facilitator, Response, error
from .metrics import CONTENT_TYPE_LATEST

log = logging.getLogger("x402_engine.service")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_JSON = [(b"content-type", b"application/json")]
_TEXT = [(b"content-type", CONTENT_TYPE_LATEST.encode())]


BIND_ENV = "X402_ENGINE_BIND"  # host:port to listen on, between --bind and [service]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def effective_bind(service: ServiceConfig, bind: str | None, environ: Mapping[str, str]) -> str:
    """The address the service listens on: ``--bind``, else ``$X402_ENGINE_BIND``, else
    ``[service] host:port``. Every way goes through the loopback guard."""
    if bind:
        return bind
    from_env = environ.get(BIND_ENV, "").strip()
    if from_env:
        return from_env
    host = f"[{service.host}]" if ":" in service.host else service.host
    return f"{host}:{service.port}"


def is_loopback_bind(bind: str) -> bool:
    """Whether a Hypercorn bind (``host:port``, ``[v6]:port``, ``unix:path``, ``fd://n``)
    is reachable from this machine only. Unknown forms count as public."""
    if bind.startswith("unix:"):
        return True
    if bind.startswith("fd://"):
        return False  # an inherited socket: its address is unknown here
    host, _, _ = bind.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return bool(host) and is_loopback(host)


def bearer_token(
    config: ServiceConfig, environ: Mapping[str, str], bind: str | None = None
) -> str | None:
    """The token /verify and /settle require, or None. Refuses to serve beyond loopback
    without one unless explicitly allowed, whichever way the address was chosen."""
    token = None
    if config.bearer_token_env:
        token = environ.get(config.bearer_token_env)
        if not token:
            raise ConfigError(f"environment variable {config.bearer_token_env} is not set")
    address = effective_bind(config, bind, environ)
    if token is None and not is_loopback_bind(address) and not config.allow_public_without_token:
        raise ConfigError(
            f"listen address {address} is not loopback and no bearer token is set: set"
            " service.bearer_token_env, or service.allow_public_without_token = true behind"
            " your own authentication"
        )
    return token


class App:
    """The ASGI application."""

    def __init__(self, facilitator: Facilitator, token: str | None) -> None:
        self.facilitator = facilitator
        self.config = facilitator.config
        self._token = token.encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        started = time.perf_counter()
        route = "other"
        try:
            route, (status, body) = await self._handle(scope, receive)
        except Exception:  # a bug, never client input: log it, answer 500, keep serving
            log.exception("unhandled error for %s %s", scope.get("method"), scope.get("path"))
            status, body = error(500, "internal error")
        self.facilitator.count(route, status, started)
        headers = _TEXT if route == "metrics" and status == 200 else _JSON
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _read_body(self, receive: Receive) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.config.body_max_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _authorized(self, scope: Scope) -> bool:
        if self._token is None:
            return True
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, presented = bytes(value).partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(
                    presented.strip(), self._token
                )
        return False

    async def _handle(self, scope: Scope, receive: Receive) -> tuple[str, Response]:
        method = scope["method"]
        path: str = scope["path"]
        header_bytes = sum(len(k) + len(v) for k, v in scope.get("headers", []))
        if header_bytes > self.config.header_max_bytes:
            return "other", error(431, "request headers too large")
        f = self.facilitator
        if path in ("/verify", "/settle"):
            route = path[1:]
            if method != "POST":
                return route, error(405, "use POST")
            if not self._authorized(scope):
                return route, error(401, "missing or wrong bearer token")
            body = await self._read_body(receive)
            if body is None:
                return route, error(
                    413, f"request body too large (limit {self.config.body_max_bytes} bytes)"
                )
            if route == "verify":
                return route, await f.verify(body)
            return route, await f.settle(body)
        if path.startswith("/admin/"):
            return "admin", await self._admin(scope, receive, path.removeprefix("/admin/"))
        if method != "GET":
            return "other", error(405, "use GET")
        if path == "/supported":
            return "supported", f.supported()
        if path.startswith("/settlements/"):
            return "settlements", await f.settlement(path.removeprefix("/settlements/"))
        if path in ("/healthz", "/health"):  # /health: what the reference examples serve
            return "healthz", f.healthz()
        if path == "/metrics":
            return "metrics", f.metrics()
        return "other", error(404, "not found")

    async def _admin(self, scope: Scope, receive: Receive, what: str) -> Response:
        """Operations while serving (report, sweep, ad hoc SQL), behind the bearer token when
        one is configured (and the service never listens beyond loopback without one)."""
        if not self._authorized(scope):
            return error(401, "missing or wrong bearer token")
        f = self.facilitator
        if what == "progress":
            return f.admin_progress() if scope["method"] == "GET" else error(405, "use GET")
        if what not in ("query", "sweep"):
            return error(404, "not found")
        if scope["method"] != "POST":
            return error(405, "use POST")
        body = await self._read_body(receive)
        if body is None:
            return error(413, f"request body too large (limit {self.config.body_max_bytes} bytes)")
        return await f.admin_query(body) if what == "query" else f.admin_sweep(body)


def hypercorn_config(
    service: ServiceConfig, bind: str, graceful_timeout_s: float = 5.0
) -> HypercornConfig:
    hc = HypercornConfig()
    hc.bind = [bind]
    hc.h11_max_incomplete_size = service.header_max_bytes
    hc.accesslog = None
    hc.errorlog = log
    hc.graceful_timeout = graceful_timeout_s
    hc.backlog = service.backlog  # bursts of new connections beyond this wait for SYN retries
    return hc


async def run_service(
    config: EngineConfig,
    *,
    environ: Mapping[str, str],
    bind: str | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    tune_collector: bool = False,
    graceful_timeout_s: float = 5.0,
) -> None:
    """Open the engine and serve HTTP until cancelled (or ``shutdown_trigger`` returns).
    ``task_status.started`` receives the bound addresses. ``tune_collector`` applies
    :func:`engine.gctune.tuned_gc` once the engine is open (the CLI does; it is process-wide)."""
    token = bearer_token(config.service, environ, bind)
    address = effective_bind(config.service, bind, environ)
    async with Engine.open(config, environ=environ) as engine:
        app = App(Facilitator(engine, config.service), token)
        with tuned_gc() if tune_collector else contextlib.nullcontext():
            await hypercorn_serve(
                app,  # type: ignore[arg-type]
                hypercorn_config(config.service, address, graceful_timeout_s),
                shutdown_trigger=shutdown_trigger,
                task_status=task_status,
            )
