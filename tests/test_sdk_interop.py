"""Interoperability with code this project did not write: the official x402 Python SDK's client,
facilitator client and Flask resource-server middleware, against our facilitator service."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import trio
from eth_account import Account
from x402.http import FacilitatorConfig, HTTPFacilitatorClientSync
from x402.http.clients.requests import x402_requests
from x402.mechanisms.evm.v1 import constants as v1_constants
from x402.schemas import (
    PaymentRequired,
    PaymentRequiredV1,
    PaymentRequirements,
    PaymentRequirementsV1,
)

from engine.chain.rpc import Rpc
from engine.config import ServiceConfig

from .sdk_helpers import NETWORK, sdk_client, v1_requirements, v2_requirements
from .service_helpers import RunningService, running_service, sdk_resource_server, token_balances

pytestmark = pytest.mark.chain
ROOT = Path(__file__).resolve().parent.parent


def _balance(svc: RunningService, owner: str) -> int:
    return token_balances(svc, [owner])[0]


def test_official_client_payloads_verify_and_settle_through_the_sdk_facilitator_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The SDK knows v1 network names only from a fixed table; teach it the local chain's name.
    monkeypatch.setitem(v1_constants.V1_NETWORK_CHAIN_IDS, "anvil", 31337)
    with running_service(tmp_path, payers=2) as svc:
        dev = svc.dev
        facilitator = HTTPFacilitatorClientSync(FacilitatorConfig(url=svc.url, timeout=60.0))
        supported = facilitator.get_supported()
        assert {(k.x402_version, k.network) for k in supported.kinds} >= {
            (2, NETWORK),
            (1, "anvil"),
        }
        client = sdk_client(dev.payer_keys[0])
        v2_req = v2_requirements(dev, 1000)
        v1_req = v1_requirements(dev, 2000)
        before = _balance(svc, dev.payee)
        cases: list[
            tuple[PaymentRequirements | PaymentRequirementsV1, PaymentRequired | PaymentRequiredV1]
        ] = [
            (v2_req, PaymentRequired(accepts=[v2_req])),
            (v1_req, PaymentRequiredV1(accepts=[v1_req])),
        ]
        for req, required in cases:
            payload = client.create_payment_payload(required)
            verified = facilitator.verify(payload, req)
            assert verified.is_valid, verified
            assert verified.payer is not None
            assert verified.payer.lower() == Account.from_key(dev.payer_keys[0]).address.lower()
            settled = facilitator.settle(payload, req)
            assert settled.success, settled
            assert settled.transaction.startswith("0x") and settled.network == req.network
            # one payment, one purchase: presented again it buys nothing, and says where it went
            again = facilitator.settle(payload, req)
            assert not again.success and again.error_reason == "duplicate_settlement", again
            assert again.transaction == settled.transaction
        assert _balance(svc, dev.payee) - before == 3000
        # A tampered amount is a negative result the SDK reads, not an exception.
        payload = client.create_payment_payload(PaymentRequired(accepts=[v2_req]))
        bigger = v2_req.model_copy(update={"amount": "5000"})
        refused = facilitator.verify(payload, bigger)
        assert not refused.is_valid and refused.invalid_reason is not None


@pytest.mark.parametrize("settlement", ["confirmed", "deferred"])
def test_sdk_resource_server_and_client_pay_end_to_end_through_our_facilitator(
    tmp_path: Path, settlement: str
) -> None:
    service = ServiceConfig(settlement=settlement)  # type: ignore[arg-type]
    with running_service(tmp_path, payers=2, service=service) as svc:
        dev = svc.dev
        merchant = dev.payee
        with sdk_resource_server(svc) as url:
            before = _balance(svc, merchant)
            session = x402_requests(sdk_client(dev.payer_keys[1]))
            unpaid = session.get(url + "/paid", headers={"x-no-pay": "1"}, timeout=60)
            assert unpaid.status_code == 200  # the session paid on the 402 by itself
            assert unpaid.json() == {"content": "the paid resource"}
            assert "PAYMENT-RESPONSE" in unpaid.headers
            deadline = time.monotonic() + 30
            while _balance(svc, merchant) - before < 1000 and time.monotonic() < deadline:
                time.sleep(0.1)  # deferred mode settles after the answer
            assert _balance(svc, merchant) - before == 1000


def test_typescript_sdk_payload_verifies_and_settles(tmp_path: Path) -> None:
    """A payload signed by the official TypeScript client (@x402/evm 2.27.0 with viem)."""
    import httpx

    with running_service(tmp_path, payers=1) as svc:
        dev = svc.dev
        signed = subprocess.run(
            [
                "node",
                str(ROOT / "tests" / "ts" / "sign.mjs"),
                dev.payer_keys[0],
                dev.token,
                dev.payee,
                "1000",
                str(dev.chain_id),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        body = signed.stdout.strip().encode()
        before = _balance(svc, dev.payee)
        verified = httpx.post(svc.url + "/verify", content=body).json()
        assert verified["isValid"] is True, verified
        settled = httpx.post(svc.url + "/settle", content=body, timeout=60).json()
        assert settled["success"] is True and settled["transaction"].startswith("0x"), settled
        assert _balance(svc, dev.payee) - before == 1000


def _rpc_call(svc: RunningService, method: str, params: list[object]) -> object:
    async def call() -> object:
        rpc = Rpc(svc.anvil.url)
        try:
            return await rpc.call(method, params)
        finally:
            await rpc.aclose()

    return trio.run(call)


def _settle_answers(svc: RunningService) -> int:
    import httpx

    for line in httpx.get(svc.url + "/metrics").text.splitlines():
        if line.startswith('x402_http_requests_total{route="settle",status="200"}'):
            return int(float(line.split()[-1]))
    return 0


def test_sdk_retry_after_settlement_pending_is_credited_exactly_once(tmp_path: Path) -> None:
    """Mining paused: the first /settle answers settlement_pending with the batch's hash, the
    SDK's resource server retries once, mining resumes during that retry, the retry answers
    success; the content is served once and the merchant is paid once."""
    import threading

    service = ServiceConfig(settle_timeout_s=8.0)  # the retry's margin for the resumed mining
    with running_service(tmp_path, payers=2, service=service) as svc:
        dev = svc.dev
        with sdk_resource_server(svc) as url:
            before = _balance(svc, dev.payee)
            _rpc_call(svc, "evm_setAutomine", [False])
            resumed = threading.Event()

            def resume_after_first_answer() -> None:
                deadline = time.monotonic() + 60
                while _settle_answers(svc) < 1 and time.monotonic() < deadline:
                    time.sleep(0.05)
                _rpc_call(svc, "evm_setAutomine", [True])
                _rpc_call(svc, "evm_mine", [])
                resumed.set()

            watcher = threading.Thread(target=resume_after_first_answer, daemon=True)
            watcher.start()
            session = x402_requests(sdk_client(dev.payer_keys[0]))
            paid = session.get(url + "/paid", timeout=90)
            watcher.join(60)
            assert resumed.is_set()
            assert paid.status_code == 200, (paid.status_code, paid.text, paid.headers)
            assert paid.json() == {"content": "the paid resource"}
            assert _settle_answers(svc) == 2  # the pending answer, then the retry's success
            assert _balance(svc, dev.payee) - before == 1000
            # the payload, presented again, buys nothing
            import httpx

            sold = httpx.get(svc.url + "/metrics").text
            assert "x402_payments_sold_total 1" in sold, sold
