"""Drive the SDK's HTTP facilitator client against the stub and record what it sends / accepts.

Run: .venv/bin/python .scratch/x402_facilitator_client_probe.py
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from eth_account import Account  # noqa: E402

from x402.http import (  # noqa: E402
    FacilitatorConfig,  # NB: the dataclass; x402.FacilitatorConfig is a different TypedDict
    HTTPFacilitatorClient,
    HTTPFacilitatorClientSync,
)
from x402.schemas import (  # noqa: E402
    PaymentPayload,
    PaymentPayloadV1,
    PaymentRequirements,
    PaymentRequirementsV1,
)
from x402_make_payloads import make_client, v1_body, v2_body  # noqa: E402
from x402_stub_facilitator import StubFacilitator  # noqa: E402


def show(title: str, obj) -> None:
    print(f"--- {title}")
    print(obj if isinstance(obj, str) else json.dumps(obj, indent=1))


def main() -> None:
    stub = StubFacilitator().start()
    client = make_client(Account.create())
    b2, b1 = v2_body(client), v1_body(client)
    p2 = PaymentPayload.model_validate(b2["paymentPayload"])
    r2 = PaymentRequirements.model_validate(b2["paymentRequirements"])
    p1 = PaymentPayloadV1.model_validate(b1["paymentPayload"])
    r1 = PaymentRequirementsV1.model_validate(b1["paymentRequirements"])

    fc = HTTPFacilitatorClientSync(FacilitatorConfig(url=stub.url, timeout=10.0))
    # also accepted: HTTPFacilitatorClientSync({"url": stub.url}) (dict form, 90 s timeout)

    sup = fc.get_supported()
    show("get_supported() ->", sup.model_dump(by_alias=True))
    show("GET /supported request headers", stub.log[-1]["headers"])

    vr = fc.verify(p2, r2)
    show("verify v2 -> VerifyResponse", vr.model_dump(by_alias=True, exclude_none=True))
    sent = stub.log[-1]
    show("POST /verify v2 request headers", sent["headers"])
    show("POST /verify v2 body == our v2_body()", str(sent["body"] == b2))
    show("POST /verify v2 body", sent["body"])

    sr = fc.settle(p2, r2)
    show("settle v2 -> SettleResponse", sr.model_dump(by_alias=True, exclude_none=True))
    show("POST /settle v2 body identical to /verify body", str(stub.log[-1]["body"] == b2))

    fc.verify(p1, r1)
    show("POST /verify v1 body", stub.log[-1]["body"])

    # ---- status code / schema handling
    cases = [
        ("/verify", (200, {"isValid": False, "invalidReason": "invalid_exact_evm_payload_signature",
                           "invalidMessage": "bad sig", "payer": "0x1"})),
        ("/verify", (400, {"isValid": False, "invalidReason": "insufficient_funds"})),
        ("/verify", (402, {"isValid": False, "invalidReason": "insufficient_funds"})),
        ("/verify", (500, {"error": "boom"})),
        ("/verify", (200, {"valid": True})),  # missing isValid
        ("/settle", (200, {"success": True, "transaction": "0x01"})),  # missing network
        ("/settle", (200, {"success": False, "errorReason": "settlement_pending",
                           "transaction": "0x" + "cd" * 32, "network": "eip155:31337",
                           "payer": "0x1"})),
        ("/settle", (200, {"success": False, "errorReason": "invalid_transaction_state",
                           "transaction": "", "network": "eip155:31337"})),
        ("/settle", (400, {"success": False, "errorReason": "invalid_scheme",
                           "transaction": "", "network": "eip155:31337"})),
    ]
    for path, spec in cases:
        stub.responses[path] = spec
        try:
            res = fc.verify(p2, r2) if path == "/verify" else fc.settle(p2, r2)
            outcome = "returned " + json.dumps(res.model_dump(by_alias=True, exclude_none=True))
        except Exception as e:  # noqa: BLE001
            outcome = f"raised {type(e).__module__}.{type(e).__name__}: {e}"
        print(f"{path} HTTP {spec[0]} {json.dumps(spec[1])}\n    -> {outcome}")

    # ---- async variant (x402ResourceServer uses this one; get_supported stays sync)
    stub.responses["/verify"] = stub._verify_ok
    stub.responses["/settle"] = stub._settle_ok

    async def run_async() -> None:
        afc = HTTPFacilitatorClient(FacilitatorConfig(url=stub.url))
        print("async get_supported (sync method):", len(afc.get_supported().kinds), "kinds")
        print("async verify:", (await afc.verify(p2, r2)).is_valid)
        print("async settle:", (await afc.settle(p2, r2)).transaction)
        await afc.aclose()

    asyncio.run(run_async())

    # ---- the server-side settle wrapper: one automatic retry on settlement_pending
    from x402.server_base import settle_with_pending_retry

    n0 = len(stub.log)
    stub.responses["/settle"] = (200, {"success": False, "errorReason": "settlement_pending",
                                       "transaction": "0x" + "cd" * 32,
                                       "network": "eip155:31337"})
    res = settle_with_pending_retry(fc, p2, r2)
    print("settle_with_pending_retry: POSTs made =", len(stub.log) - n0,
          "final success =", res.success, res.error_reason)
    stub.stop()


if __name__ == "__main__":
    main()
