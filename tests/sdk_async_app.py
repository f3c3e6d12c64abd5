"""An HTTP facilitator built on the official SDK's asyncio ``x402Facilitator`` (test helper): a
minimal ASGI app (``/verify``, ``/settle``, ``/supported``, the SDK HTTP client's wire form)
served by Hypercorn's asyncio worker in a background thread, as an operator's asyncio
facilitator would be. The mechanisms are whatever the caller registered on the facilitator."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

from hypercorn.asyncio import serve
from hypercorn.config import Config
from x402 import x402Facilitator
from x402.schemas import (
    PaymentPayload,
    PaymentPayloadV1,
    PaymentRequirements,
    PaymentRequirementsV1,
)

from engine.dev.devchain import free_port

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def asgi_app(facilitator: x402Facilitator) -> Callable[..., Awaitable[None]]:
    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        status, answer = await _route(facilitator, scope["method"], scope["path"], body)
        data = json.dumps(answer).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": data})

    return app


async def _route(
    facilitator: x402Facilitator, method: str, path: str, body: bytes
) -> tuple[int, Any]:
    if method == "GET" and path == "/supported":
        return 200, facilitator.get_supported().model_dump(
            mode="json", by_alias=True, exclude_none=True
        )
    if method != "POST" or path not in ("/verify", "/settle"):
        return 404, {"error": "not found"}
    try:
        request = json.loads(body)
        version = request.get("x402Version") or request["paymentPayload"]["x402Version"]
        payload: PaymentPayload | PaymentPayloadV1
        requirements: PaymentRequirements | PaymentRequirementsV1
        if version == 1:
            payload = PaymentPayloadV1.model_validate(request["paymentPayload"])
            requirements = PaymentRequirementsV1.model_validate(request["paymentRequirements"])
        else:
            payload = PaymentPayload.model_validate(request["paymentPayload"])
            requirements = PaymentRequirements.model_validate(request["paymentRequirements"])
    except (ValueError, KeyError, TypeError) as exc:
        return 400, {"error": str(exc)}
    if path == "/verify":
        result: Any = await facilitator.verify(payload, requirements)
    else:
        result = await facilitator.settle(payload, requirements)
    return 200, result.model_dump(mode="json", by_alias=True, exclude_none=True)


@contextmanager
def serving(facilitator: x402Facilitator) -> Iterator[str]:
    """Serve on 127.0.0.1 in a thread of its own (its own asyncio loop); yields the URL."""
    port = free_port()
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    started = threading.Event()

    async def main() -> None:
        started.set()
        await serve(asgi_app(facilitator), config, shutdown_trigger=stop.wait)

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    started.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # until Hypercorn listens
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()
