"""The engine as a scheme mechanism inside the official x402 SDK's facilitator: payloads from the
SDK's own client (v1 and v2) verify and settle through an SDK ``x402Facilitator`` (asyncio) and
``x402FacilitatorSync`` with ``register_batched_exact_evm``, concurrent settles batch, and a
replayed payload is refused; on a real anvil."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from eth_account import Account
from x402 import x402Facilitator, x402FacilitatorSync
from x402.http.clients.requests import x402_requests
from x402.mechanisms.evm.v1 import constants as v1_constants
from x402.schemas import (
    PaymentPayload,
    PaymentRequired,
    PaymentRequiredV1,
    PaymentRequirements,
    PaymentRequirementsV1,
    SettleResponse,
)

from engine.chain.rpc import Rpc
from engine.config import PolicyConfig
from engine.dev.devchain import Anvil, DevChain, engine_config, setup_devchain
from engine.handle import EngineHandle
from engine.integrations.x402_sdk import register_batched_exact_evm

from .chain import balances
from .sdk_async_app import serving
from .sdk_helpers import NETWORK, sdk_client, v1_requirements, v2_requirements
from .service_helpers import sdk_resource_server_at

pytestmark = pytest.mark.chain


@contextmanager
def engine_on(anvil: Anvil, tmp: Path, payers: int) -> Iterator[tuple[DevChain, EngineHandle]]:
    dev = trio.run(lambda: setup_devchain(anvil.url, payers=payers))
    config, env = engine_config(
        dev, str(tmp / "ledger.duckdb"), policy=PolicyConfig(max_wait_ms=300)
    )
    with EngineHandle(config, environ=env) as handle:
        yield dev, handle


def _balance(anvil: Anvil, dev: DevChain) -> int:
    async def read() -> int:
        rpc = Rpc(anvil.url)
        try:
            return (await balances(rpc, dev.token, [dev.payee]))[0]
        finally:
            await rpc.aclose()

    return trio.run(read)


def test_sdk_facilitators_with_our_mechanism_verify_and_settle_sdk_client_payloads(
    anvil: Anvil, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(v1_constants.V1_NETWORK_CHAIN_IDS, "anvil", 31337)  # the SDK client's
    with engine_on(anvil, tmp_path, payers=3) as (dev, handle):
        facilitator = x402Facilitator()
        register_batched_exact_evm(facilitator, handle)
        supported = facilitator.get_supported()
        kinds = {(k.x402_version, k.scheme, k.network): k.extra for k in supported.kinds}
        assert kinds[(2, "exact", NETWORK)] == {"assetTransferMethods": ["eip3009", "permit2"]}
        assert (1, "exact", "anvil") in kinds
        signers = handle.supported()["signers"]["eip155:*"]
        assert supported.signers["eip155:*"] == signers and signers

        client = sdk_client(dev.payer_keys[0])
        v2 = v2_requirements(dev, 1000)
        v1 = v1_requirements(dev, 2000)
        before = _balance(anvil, dev)

        async def main() -> None:
            cases: list[
                tuple[
                    PaymentRequirements | PaymentRequirementsV1,
                    PaymentRequired | PaymentRequiredV1,
                ]
            ] = [
                (v2, PaymentRequired(accepts=[v2])),
                (v1, PaymentRequiredV1(accepts=[v1])),
            ]
            for req, required in cases:
                payload = client.create_payment_payload(required)
                verified = await facilitator.verify(payload, req)
                assert verified.is_valid, verified
                assert verified.payer == Account.from_key(dev.payer_keys[0]).address.lower()
                settled = await facilitator.settle(payload, req)
                assert settled.success, settled
                assert settled.transaction.startswith("0x") and settled.network == req.network
                assert settled.amount == ("1000" if req is v2 else "2000")
                assert settled.extra is not None and settled.extra["settlementId"] > 0
                # replayed: refused, with where it went (one payment, one purchase)
                again = await facilitator.settle(payload, req)
                assert not again.success and again.error_reason == "duplicate_settlement"
                assert again.transaction == settled.transaction
            # a tampered amount: a negative result the SDK reads, not an exception
            payload = client.create_payment_payload(PaymentRequired(accepts=[v2]))
            bigger = v2.model_copy(update={"amount": "5000"})
            refused = await facilitator.verify(payload, bigger)
            assert not refused.is_valid and refused.invalid_reason is not None
            refused_settle = await facilitator.settle(payload, bigger)
            assert not refused_settle.success and refused_settle.error_reason is not None

        asyncio.run(main())
        assert _balance(anvil, dev) - before == 3000

        # The same mechanism in the SDK's synchronous facilitator.
        sync_facilitator = x402FacilitatorSync()
        register_batched_exact_evm(sync_facilitator, handle)
        payload = sdk_client(dev.payer_keys[1]).create_payment_payload(
            PaymentRequired(accepts=[v2])
        )
        assert sync_facilitator.verify(payload, v2).is_valid
        settled = sync_facilitator.settle(payload, v2)
        assert settled.success and settled.transaction.startswith("0x"), settled
        assert not sync_facilitator.settle(payload, v2).success
        assert _balance(anvil, dev) - before == 4000


def test_200_concurrent_settles_through_the_asyncio_facilitator_share_a_few_transactions(
    anvil: Anvil, tmp_path: Path
) -> None:
    with engine_on(anvil, tmp_path, payers=20) as (dev, handle):
        facilitator = x402Facilitator()
        register_batched_exact_evm(facilitator, handle)
        req = v2_requirements(dev, 1000)
        clients = [sdk_client(key) for key in dev.payer_keys]
        payloads: list[PaymentPayload] = [
            clients[i % len(clients)].create_payment_payload(PaymentRequired(accepts=[req]))  # type: ignore[misc]
            for i in range(200)
        ]
        before = _balance(anvil, dev)

        async def main() -> list[SettleResponse]:
            return list(await asyncio.gather(*(facilitator.settle(p, req) for p in payloads)))

        answers = asyncio.run(main())
        assert all(a.success for a in answers), [a for a in answers if not a.success][:3]
        transactions = {a.transaction for a in answers}
        print(f"200 concurrent settles: {len(transactions)} transactions")
        assert len(transactions) <= 5, len(transactions)  # a handful, not 200
        assert _balance(anvil, dev) - before == 200 * 1000

        async def replay() -> list[SettleResponse]:
            return list(await asyncio.gather(*(facilitator.settle(p, req) for p in payloads[:20])))

        again = asyncio.run(replay())
        assert all(a.error_reason == "duplicate_settlement" for a in again), again[:3]
        assert _balance(anvil, dev) - before == 200 * 1000

        # An operator's before-settle hook after ours could abort a payment: the hook then
        # leaves settling to the mechanism itself (blocking, one at a time), and nothing is
        # sold that the SDK does not answer.
        seen: list[str] = []
        facilitator.on_before_settle(lambda context: seen.append("operator's hook"))
        more = [c.create_payment_payload(PaymentRequired(accepts=[req])) for c in clients[:3]]

        async def later() -> list[SettleResponse]:
            return list(await asyncio.gather(*(facilitator.settle(p, req) for p in more)))

        assert all(a.success for a in asyncio.run(later()))
        assert seen == ["operator's hook"] * 3
        facilitator.on_before_verify(lambda context: seen.append("operator's verify hook"))
        fresh = clients[4].create_payment_payload(PaymentRequired(accepts=[req]))
        assert asyncio.run(facilitator.verify(fresh, req)).is_valid
        assert seen[-1] == "operator's verify hook"
        assert _balance(anvil, dev) - before == 203 * 1000


def test_an_sdk_resource_server_on_an_asyncio_facilitator_with_our_mechanism_sells_once(
    anvil: Anvil, tmp_path: Path
) -> None:
    """The whole SDK stack with the engine inside: the SDK's client pays the SDK's Flask
    resource server, whose facilitator client calls an HTTP facilitator built on the SDK's
    asyncio x402Facilitator with our mechanism registered."""
    with engine_on(anvil, tmp_path, payers=2) as (dev, handle):
        facilitator = x402Facilitator()
        register_batched_exact_evm(facilitator, handle)
        before = _balance(anvil, dev)
        with (
            serving(facilitator) as facilitator_url,
            sdk_resource_server_at(facilitator_url, dev.token, dev.payee) as url,
        ):
            session = x402_requests(sdk_client(dev.payer_keys[1]))
            paid = session.get(url + "/paid", timeout=60)
            assert paid.status_code == 200, paid.text
            assert paid.json() == {"content": "the paid resource"}
            receipt = json.loads(base64.b64decode(paid.headers["PAYMENT-RESPONSE"]))
            assert receipt["success"] and receipt["transaction"].startswith("0x"), receipt
        assert _balance(anvil, dev) - before == 1000
        assert handle.statistics().settled == 1


def test_engine_answers_map_onto_the_sdk_responses_as_our_service_sends_them() -> None:
    """Field for field what ``/verify`` and ``/settle`` of our service answer (deferred success,
    pending, refusal), as the SDK's models."""
    from engine.integrations.x402_sdk import settle_response, verify_response
    from engine.model import Rejected, SettleAnswer

    refused = verify_response(None, Rejected("invalid_payload", "bad value", "0xab"))
    assert refused.model_dump(by_alias=True, exclude_none=True) == {
        "isValid": False,
        "invalidReason": "invalid_payload",
        "invalidMessage": "bad value",
        "payer": "0xab",
    }
    deferred = settle_response(
        SettleAnswer(True, "", payer="0xab", settlement_id=7, amount=1000, state="accepted"),
        NETWORK,
    )
    assert deferred.model_dump(by_alias=True, exclude_none=True) == {
        "success": True,
        "payer": "0xab",
        "transaction": "",
        "network": NETWORK,
        "amount": "1000",
        "extra": {"settlementId": 7, "state": "accepted"},
    }
    pending = settle_response(
        SettleAnswer(False, "0xcd", "settlement_pending", "not yet", "0xab", 8, 1000, "submitted"),
        NETWORK,
    )
    assert pending.model_dump(by_alias=True, exclude_none=True) == {
        "success": False,
        "errorReason": "settlement_pending",
        "errorMessage": "not yet",
        "payer": "0xab",
        "transaction": "0xcd",
        "network": NETWORK,
        "extra": {"settlementId": 8},
    }


def test_a_started_call_reports_once_and_a_failing_callback_cannot_stop_the_engine(
    anvil: Anvil, tmp_path: Path
) -> None:
    import queue

    with engine_on(anvil, tmp_path, payers=1) as (_dev, handle):
        answers: queue.Queue[Any] = queue.Queue()

        def broken(outcome: object) -> None:
            raise RuntimeError("the host's loop is gone")

        handle.start(handle.engine.verify, b"{}", b"{}", done=broken)
        handle.start(handle.engine.verify, b"{}", b"{}", done=lambda a: answers.put(a))
        payment, rejected = answers.get(timeout=10)
        assert payment is None and rejected is not None and rejected.reason
        assert answers.empty()
        assert handle.statistics().accepted == 0  # the engine still answers
