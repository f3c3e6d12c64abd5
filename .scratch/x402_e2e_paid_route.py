"""End to end without a chain: SDK resource server (FastAPI and Flask middleware) + stub
facilitator + SDK paying clients (httpx async, requests sync), all on 127.0.0.1.

Run: .venv/bin/python .scratch/x402_e2e_paid_route.py
Needs: fastapi, uvicorn, flask in the venv (pip install fastapi uvicorn flask).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import threading
import time
from decimal import Decimal

sys.path.insert(0, os.path.dirname(__file__))

import httpx  # noqa: E402
from eth_account import Account  # noqa: E402

from x402 import x402Client, x402ClientSync, x402ResourceServer, x402ResourceServerSync  # noqa: E402
from x402.http import (  # noqa: E402
    FacilitatorConfig,
    HTTPFacilitatorClient,
    HTTPFacilitatorClientSync,
    x402HTTPClient,
)
from x402.http.clients.httpx import x402HttpxClient  # noqa: E402
from x402.http.clients.requests import x402_requests  # noqa: E402
from x402.http.utils import decode_payment_required_header  # noqa: E402
from x402.mechanisms.evm.exact import ExactEvmScheme, ExactEvmServerScheme  # noqa: E402
from x402.schemas import AssetAmount  # noqa: E402
from x402_stub_facilitator import StubFacilitator  # noqa: E402

NETWORK = "eip155:31337"
TOKEN = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
PAY_TO = "0x70997970C51812dc3A65C0dd76A14Aaf5C2B5Ed2"
EIP712 = {"name": "USD Coin", "version": "2"}
DECIMALS = 6

events: list[str] = []  # ordering proof: handler vs /settle


def usd_to_our_token(amount: str, network: str) -> AssetAmount | None:
    """Money parser: gets the decimal string of "$0.001" -> "0.001"; None = try next parser."""
    if network != NETWORK:
        return None
    atomic = int(Decimal(amount) * 10**DECIMALS)
    return AssetAmount(amount=str(atomic), asset=TOKEN, extra=dict(EIP712))


def make_server_scheme() -> ExactEvmServerScheme:
    return ExactEvmServerScheme().register_money_parser(usd_to_our_token)


ROUTES = {
    # "$0.001" goes through the money parser above -> amount "1000" of TOKEN
    "GET /paid": {
        "accepts": {"scheme": "exact", "payTo": PAY_TO, "price": "$0.001", "network": NETWORK,
                    "maxTimeoutSeconds": 120},
        "description": "paid thing",
    },
    # explicit atomic amount + asset (+ EIP-712 domain in extra); no parser needed
    "GET /paid-atomic": {
        "accepts": {"scheme": "exact", "payTo": PAY_TO, "network": NETWORK,
                    "price": AssetAmount(amount="2500", asset=TOKEN, extra=dict(EIP712))},
    },
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- FastAPI (async server)
def start_fastapi(facilitator_url: str) -> tuple[str, object]:
    import uvicorn
    from fastapi import FastAPI

    from x402.http.middleware.fastapi import payment_middleware

    server = x402ResourceServer(HTTPFacilitatorClient(FacilitatorConfig(url=facilitator_url)))
    server.register(NETWORK, make_server_scheme())

    app = FastAPI()
    # Build once: this calls GET /supported right here (sync_facilitator_on_start=True).
    x402_mw = payment_middleware(ROUTES, server)

    @app.middleware("http")
    async def _x402(request, call_next):
        return await x402_mw(request, call_next)

    @app.get("/paid")
    async def paid():
        events.append("handler /paid")
        return {"ok": True, "what": "paid content"}

    @app.get("/paid-atomic")
    async def paid_atomic():
        events.append("handler /paid-atomic")
        return {"ok": True}

    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=uv.run, daemon=True).start()
    while not uv.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", uv


# ---------------------------------------------------------------- Flask (sync server)
def start_flask(facilitator_url: str) -> tuple[str, object]:
    from flask import Flask, jsonify
    from werkzeug.serving import make_server

    from x402.http.middleware.flask import PaymentMiddleware

    server = x402ResourceServerSync(
        HTTPFacilitatorClientSync(FacilitatorConfig(url=facilitator_url))
    )
    server.register(NETWORK, make_server_scheme())

    app = Flask(__name__)

    @app.get("/paid")
    def paid():
        events.append("handler /paid (flask)")
        return jsonify(ok=True, what="paid content")

    @app.get("/paid-atomic")
    def paid_atomic():
        events.append("handler /paid-atomic (flask)")
        return jsonify(ok=True)

    PaymentMiddleware(app, ROUTES, server)  # wraps app.wsgi_app; GET /supported now

    port = free_port()
    srv = make_server("127.0.0.1", port, app, threaded=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{port}", srv


def payer_client_sync(account) -> x402ClientSync:
    c = x402ClientSync()
    c.register(NETWORK, ExactEvmScheme(account))
    c.set_spend_controls(False)
    return c


def payer_client_async(account) -> x402Client:
    c = x402Client()
    c.register(NETWORK, ExactEvmScheme(account))
    c.set_spend_controls(False)
    return c


def settle_header(resp_headers) -> dict | None:
    h = resp_headers.get("PAYMENT-RESPONSE")
    if not h:
        return None
    settle = x402HTTPClient(x402Client()).get_payment_settle_response(resp_headers.get)
    return settle.model_dump(by_alias=True, exclude_none=True)


def main() -> None:
    stub = StubFacilitator(network=NETWORK).start()
    stub.responses["/settle"] = lambda body: (events.append("facilitator /settle")
                                              or stub._settle_ok(body))
    account = Account.create()
    fa_url, uv = start_fastapi(stub.url)
    fl_url, fl = start_flask(stub.url)
    print("stub facilitator", stub.url, "| fastapi", fa_url, "| flask", fl_url)
    print("calls to facilitator during startup:", [f"{e['method']} {e['path']}" for e in stub.log])

    # -- what an unpaid request gets
    r = httpx.get(fa_url + "/paid")
    pr = decode_payment_required_header(r.headers["PAYMENT-REQUIRED"])
    print("\nunpaid GET /paid ->", r.status_code, "body:", r.text[:80])
    print("PAYMENT-REQUIRED header decoded:",
          json.dumps(pr.model_dump(by_alias=True, exclude_none=True), indent=1))

    ok = True
    for base in (fa_url, fl_url):
        # sync: requests
        s = x402_requests(payer_client_sync(account))
        for path in ("/paid", "/paid-atomic"):
            events.clear()
            n0 = len(stub.log)
            resp = s.get(base + path, timeout=30)
            calls = [e["path"] for e in stub.log[n0:]]
            print(f"\n[requests] GET {base}{path} -> {resp.status_code} {resp.text.strip()[:60]}")
            print("  facilitator calls:", calls, "| order:", events)
            print("  PAYMENT-RESPONSE:", settle_header(resp.headers))
            ok &= resp.status_code == 200

        # async: httpx
        async def run(base: str = base) -> None:
            nonlocal ok
            async with x402HttpxClient(payer_client_async(account), timeout=30) as hc:
                events.clear()
                resp = await hc.get(base + "/paid")
                print(f"\n[httpx] GET {base}/paid -> {resp.status_code} {resp.text[:60]}")
                print("  order:", events, "| PAYMENT-RESPONSE:", settle_header(resp.headers))
                ok &= resp.status_code == 200

        asyncio.run(run())

    verify_body = next(e["body"] for e in stub.log if e["path"] == "/verify")
    print("\nfirst POST /verify body sent by the middleware:")
    print(json.dumps(verify_body, indent=1))

    # -- failure paths through the middleware
    stub.responses["/verify"] = (200, {"isValid": False, "invalidReason": "insufficient_funds",
                                       "invalidMessage": "nope", "payer": account.address})
    resp = x402_requests(payer_client_sync(account)).get(fa_url + "/paid")
    err = decode_payment_required_header(resp.headers["PAYMENT-REQUIRED"]).error
    print("\nverify isValid=false ->", resp.status_code, "PaymentRequired.error =", err)
    stub.responses["/verify"] = (400, {"isValid": False, "invalidReason": "insufficient_funds"})
    resp = x402_requests(payer_client_sync(account)).get(fa_url + "/paid")
    err = decode_payment_required_header(resp.headers["PAYMENT-REQUIRED"]).error
    print("verify HTTP 400 ->", resp.status_code, "PaymentRequired.error =", err)
    stub.responses["/verify"] = stub._verify_ok
    n0 = len(stub.log)
    stub.responses["/settle"] = (200, {"success": False, "errorReason": "settlement_pending",
                                       "transaction": "0x" + "cd" * 32, "network": NETWORK})
    events.clear()
    resp = x402_requests(payer_client_sync(account)).get(fa_url + "/paid")
    print("settle settlement_pending (x2) ->", resp.status_code, "body:", resp.text[:40],
          "| settle POSTs:", sum(e["path"] == "/settle" for e in stub.log[n0:]),
          "| handler ran:", events, "| PAYMENT-RESPONSE:", settle_header(resp.headers))

    uv.should_exit = True
    fl.shutdown()
    stub.stop()
    print("\nALL PAID REQUESTS 200:", ok)


if __name__ == "__main__":
    main()
