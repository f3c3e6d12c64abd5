"""A resource server built with the official x402 SDK's Flask middleware (test helper, run as
a subprocess: the SDK may call os._exit on a configuration error).

    python -m tests.sdk_resource_server FACILITATOR_URL TOKEN PAY_TO

Protects GET /paid at $0.001 (1000 base units of the 6-decimal test token) on eip155:31337 and
prints ``READY <url>`` once serving on 127.0.0.1.
"""

from __future__ import annotations

import logging
import sys
from decimal import Decimal

from flask import Flask, jsonify
from werkzeug.serving import make_server
from x402 import x402ResourceServerSync
from x402.http import FacilitatorConfig, HTTPFacilitatorClientSync
from x402.http.middleware.flask import PaymentMiddleware
from x402.mechanisms.evm.exact import ExactEvmServerScheme
from x402.schemas import AssetAmount

NETWORK = "eip155:31337"


def main(facilitator_url: str, token: str, pay_to: str) -> None:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    domain = {"name": "USD Coin", "version": "2"}

    def dollars_to_token(amount: str, network: str) -> AssetAmount | None:
        if network != NETWORK:
            return None
        return AssetAmount(amount=str(int(Decimal(amount) * 10**6)), asset=token, extra=domain)

    server = x402ResourceServerSync(
        HTTPFacilitatorClientSync(FacilitatorConfig(url=facilitator_url, timeout=60.0))
    )
    server.register(NETWORK, ExactEvmServerScheme().register_money_parser(dollars_to_token))
    app = Flask(__name__)

    @app.get("/paid")
    def paid() -> object:
        return jsonify(content="the paid resource")

    routes = {
        "GET /paid": {
            "accepts": {
                "scheme": "exact",
                "payTo": pay_to,
                "price": "$0.001",
                "network": NETWORK,
                "maxTimeoutSeconds": 120,
            },
            "description": "a paid resource",
        }
    }
    PaymentMiddleware(app, routes, server)
    http = make_server("127.0.0.1", 0, app, threaded=True)
    print(f"READY http://127.0.0.1:{http.server_port}", flush=True)
    http.serve_forever()


if __name__ == "__main__":
    main(*sys.argv[1:4])
