"""What must GET /supported return for the SDK resource server to accept exact on eip155:31337?

Calls x402HTTPResourceServerSync.initialize() directly (the middlewares call the same thing,
but they os._exit(1) the whole process on a RouteConfigurationError / capability error!).
Run: .venv/bin/python .scratch/x402_supported_probe.py
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from x402 import x402ResourceServerSync  # noqa: E402
from x402.http import FacilitatorConfig, HTTPFacilitatorClientSync  # noqa: E402
from x402.http.x402_http_server import x402HTTPResourceServerSync  # noqa: E402
from x402.mechanisms.evm.exact import ExactEvmServerScheme  # noqa: E402
from x402.schemas import AssetAmount, ResourceConfig  # noqa: E402
from x402_stub_facilitator import StubFacilitator  # noqa: E402

NET = "eip155:31337"
TOKEN = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
PAY_TO = "0x70997970C51812dc3A65C0dd76A14Aaf5C2B5Ed2"
PRICE = AssetAmount(amount="1000", asset=TOKEN, extra={"name": "USD Coin", "version": "2"})
ROUTES = {"GET /paid": {"accepts": {"scheme": "exact", "payTo": PAY_TO, "price": PRICE,
                                    "network": NET}}}
SIGNERS = {"eip155:*": ["0x90F79bf6EB2c4f870365E785982E1f101E93b906"]}

variants = {
    "v2 exact eip155:31337": (200, {"kinds": [{"x402Version": 2, "scheme": "exact",
                                               "network": NET}],
                                    "extensions": [], "signers": SIGNERS}),
    "only kinds key": (200, {"kinds": [{"x402Version": 2, "scheme": "exact", "network": NET}]}),
    "wildcard eip155:*": (200, {"kinds": [{"x402Version": 2, "scheme": "exact",
                                           "network": "eip155:*"}]}),
    "x402Version 1 only": (200, {"kinds": [{"x402Version": 1, "scheme": "exact",
                                            "network": NET}]}),
    "other chain only": (200, {"kinds": [{"x402Version": 2, "scheme": "exact",
                                          "network": "eip155:8453"}]}),
    "empty kinds": (200, {"kinds": []}),
    "HTTP 503": (503, {"error": "down"}),
    "snake_case x402_version": (200, {"kinds": [{"x402_version": 2, "scheme": "exact",
                                                 "network": NET}]}),
}

for name, spec in variants.items():
    stub = StubFacilitator().start()
    stub.responses["/supported"] = spec
    server = x402ResourceServerSync(HTTPFacilitatorClientSync(FacilitatorConfig(url=stub.url)))
    server.register(NET, ExactEvmServerScheme())
    http_server = x402HTTPResourceServerSync(server, ROUTES)
    try:
        http_server.initialize()
        reqs = server.build_payment_requirements(
            ResourceConfig(scheme="exact", pay_to=PAY_TO, price=PRICE, network=NET)
        )
        outcome = "OK, requirements extra=" + str(reqs[0].extra)
    except Exception as e:  # noqa: BLE001
        outcome = f"{type(e).__name__}: {str(e).strip()[:150]}"
    print(f"{name:28s} -> {outcome}")
    stub.stop()
