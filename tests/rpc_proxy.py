"""A small fault-injecting JSON-RPC proxy in front of anvil, for tests (127.0.0.1 only).

Rules are per method, consumed in order: ``"forward"``, ``"forward-then-error"`` (the node
takes the request, the caller gets a JSON-RPC error, as behind a proxy that timed out),
``"error"`` (HTTP 502, the node never sees it)."""

from __future__ import annotations

from collections import deque
from typing import Any

import httpx
import msgspec
import trio
from hypercorn.config import Config
from hypercorn.trio import serve


class RpcProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.rules: dict[str, deque[str]] = {}
        self.seen: list[tuple[str, str]] = []  # (method, what was done)
        self.url = ""

    def inject(self, method: str, *actions: str) -> None:
        self.rules.setdefault(method, deque()).extend(actions)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
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
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = msgspec.json.decode(body)
        method = request[0]["method"] if isinstance(request, list) else request["method"]
        queue = self.rules.get(method)
        action = queue.popleft() if queue else "forward"
        self.seen.append((method, action))
        status, answer = 200, b""
        if action == "error":
            status, answer = 502, b"bad gateway"
        else:
            async with httpx.AsyncClient() as client:
                forwarded = await client.post(
                    self.upstream, content=body, headers={"content-type": "application/json"}
                )
            answer = forwarded.content
            if action == "forward-then-error":
                answer = msgspec.json.encode(
                    {
                        "jsonrpc": "2.0",
                        "id": request["id"],
                        "error": {"code": -32000, "message": "request timed out"},
                    }
                )
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": answer})

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        config = Config()
        config.bind = ["127.0.0.1:0"]
        config.accesslog = None

        async def ready(task_status: trio.TaskStatus[list[str]]) -> None:
            await serve(self, config, task_status=task_status)  # type: ignore[arg-type]

        async with trio.open_nursery() as nursery:
            addresses: list[str] = await nursery.start(ready)
            self.url = addresses[0]
            task_status.started(self.url)
