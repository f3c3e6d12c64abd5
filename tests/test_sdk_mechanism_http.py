"""Our ``exact`` mechanism inside the official SDK's synchronous facilitator
(``engine/integrations/x402_sdk.py``), behind the HTTP front of ``benchmarks/sdk_facilitator.py``,
driven by the SDK's own resource-server middleware and client, on a real anvil."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import trio
from x402 import x402FacilitatorSync
from x402.http import FacilitatorConfig, HTTPFacilitatorClientSync
from x402.http.clients.requests import x402_requests
from x402.http.utils import decode_payment_response_header
from x402.mechanisms.evm.v1 import constants as v1_constants
from x402.schemas import (
    PaymentRequired,
    PaymentRequiredV1,
    SettleResponse,
)

from benchmarks.sdk_facilitator import engine_label, serve_facilitator_in_thread
from engine.config import PolicyConfig
from engine.dev.devchain import Anvil, engine_config, setup_devchain
from engine.handle import EngineHandle
from engine.integrations.x402_sdk import register_batched_exact_evm

from .sdk_helpers import NETWORK, sdk_client, v1_requirements, v2_requirements
from .service_helpers import RunningService, sdk_resource_server, token_balances

pytestmark = pytest.mark.chain


@contextmanager
def sdk_facilitator_with_engine(anvil: Anvil, tmp: Path, payers: int) -> Iterator[RunningService]:
    """The devchain on ``anvil``, an engine on it, an ``x402FacilitatorSync`` with our mechanism
    registered, behind the HTTP front in a thread. The ``RunningService`` names the front's URL
    (what ``sdk_resource_server`` points the SDK's middleware at)."""
    dev = trio.run(lambda: setup_devchain(anvil.url, payers=payers))
    config, env = engine_config(
        dev, str(tmp / "ledger.duckdb"), policy=PolicyConfig(max_wait_ms=200)
    )
    with EngineHandle(config, environ=env) as handle:
        facilitator = x402FacilitatorSync()
        register_batched_exact_evm(facilitator, handle)
        url, stop = serve_facilitator_in_thread(facilitator, label=engine_label(handle))
        try:
            yield RunningService(url, dev, config, anvil)
        finally:
            stop()


def test_sdk_middleware_and_client_pay_through_the_sdk_facilitator_with_our_mechanism(
    anvil: Anvil, tmp_path: Path
) -> None:
    with sdk_facilitator_with_engine(anvil, tmp_path, payers=2) as svc:
        dev = svc.dev
        kinds = httpx.get(svc.url + "/supported", timeout=10).json()["kinds"]
        exact = {(k["x402Version"], k["network"]): k for k in kinds if k["scheme"] == "exact"}
        assert set(exact) >= {(2, NETWORK), (1, "anvil")}, kinds
        for kind in (exact[2, NETWORK], exact[1, "anvil"]):
            assert "eip3009" in kind["extra"]["assetTransferMethods"], kind

        with sdk_resource_server(svc) as resource:
            before = token_balances(svc, [dev.payee])[0]
            session = x402_requests(sdk_client(dev.payer_keys[0]))
            paid = session.get(resource + "/paid", timeout=60)
            assert paid.status_code == 200, paid.text
            assert paid.json() == {"content": "the paid resource"}
            settled = decode_payment_response_header(paid.headers["PAYMENT-RESPONSE"])
            assert settled.success and settled.transaction.startswith("0x"), settled
            assert settled.network == NETWORK
            assert settled.extra and isinstance(settled.extra.get("settlementId"), int), settled
            assert token_balances(svc, [dev.payee])[0] - before == 1000


def test_concurrent_settles_through_the_sdk_facilitator_batch_and_v1_settles(
    anvil: Anvil, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SDK's sync facilitator calls our mechanism in each request's thread: concurrent
    settles wait in the engine together and share transactions. A v1 payload (the devchain's
    v1 name ``anvil``) settles through the same front."""
    # The SDK's v1 client knows v1 network names only from a fixed table.
    monkeypatch.setitem(v1_constants.V1_NETWORK_CHAIN_IDS, "anvil", 31337)
    with sdk_facilitator_with_engine(anvil, tmp_path, payers=2) as svc:
        dev = svc.dev
        v2_req = v2_requirements(dev, 1000)
        count = 8
        clients = [sdk_client(dev.payer_keys[i % 2]) for i in range(count)]
        payloads = [c.create_payment_payload(PaymentRequired(accepts=[v2_req])) for c in clients]
        answers: list[SettleResponse | BaseException] = [RuntimeError("no answer")] * count
        before = token_balances(svc, [dev.payee])[0]

        def settle(i: int) -> None:
            http = HTTPFacilitatorClientSync(FacilitatorConfig(url=svc.url, timeout=60.0))
            try:
                verified = http.verify(payloads[i], v2_req)
                assert verified.is_valid, verified
                answers[i] = http.settle(payloads[i], v2_req)
            except BaseException as exc:
                answers[i] = exc

        threads = [threading.Thread(target=settle, args=(i,)) for i in range(count)]
        start = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        elapsed = time.monotonic() - start
        settled = [a for a in answers if isinstance(a, SettleResponse) and a.success]
        assert len(settled) == count, answers
        transactions = {a.transaction for a in settled}
        assert len(transactions) <= count // 2, (transactions, elapsed)  # batched, not one each
        assert token_balances(svc, [dev.payee])[0] - before == count * 1000

        # one payment, one purchase through the SDK's facilitator too
        http = HTTPFacilitatorClientSync(FacilitatorConfig(url=svc.url, timeout=60.0))
        again = http.settle(payloads[0], v2_req)
        assert not again.success and again.error_reason == "duplicate_settlement", again

        v1_req = v1_requirements(dev, 2000)
        payload = clients[0].create_payment_payload(PaymentRequiredV1(accepts=[v1_req]))
        assert http.verify(payload, v1_req).is_valid
        v1_settled = http.settle(payload, v1_req)
        assert v1_settled.success and v1_settled.network == "anvil", v1_settled
        assert token_balances(svc, [dev.payee])[0] - before == count * 1000 + 2000
