"""Permit2 payers (x402 ``exact`` with assetTransferMethod "permit2", and ``upto``): payloads
signed by the official Python SDK's clients verify and settle through our service, in batches,
against our Permit2 and proxies placed at the canonical addresses on a real anvil."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from x402 import x402ClientSync
from x402.http import FacilitatorConfig, HTTPFacilitatorClientSync
from x402.mechanisms.evm.exact import ExactEvmScheme
from x402.mechanisms.evm.signers import EthAccountSigner
from x402.mechanisms.evm.upto.client import UptoEvmScheme
from x402.schemas import PaymentPayload, PaymentRequired, PaymentRequirements

from engine.chain.rpc import Rpc
from engine.dev.devchain import DevChain, approve_permit2

from .chain import balances
from .sdk_helpers import v2_requirements
from .service_helpers import RunningService, on_chain, running_service

pytestmark = pytest.mark.chain
NETWORK = "eip155:31337"
PERMIT2_EXTRA = {"name": "USD Coin", "version": "2", "assetTransferMethod": "permit2"}


def _balances(svc: RunningService, owners: list[str]) -> list[int]:
    return list(on_chain(svc, lambda rpc: balances(rpc, svc.dev.token, owners)))


def _address(key: str) -> str:
    return str(Account.from_key(key).address).lower()


def _client(key: str) -> x402ClientSync:
    signer = EthAccountSigner(Account.from_key(key))
    client = x402ClientSync()
    client.register(NETWORK, ExactEvmScheme(signer))
    client.register(NETWORK, UptoEvmScheme(signer))
    client.set_spend_controls(False)  # our test token is not one of the SDK's known assets
    return client


def _exact(svc: RunningService, amount: int) -> PaymentRequirements:
    return v2_requirements(svc.dev, amount, PERMIT2_EXTRA)


def _upto(dev: DevChain, maximum: int) -> PaymentRequirements:
    """upto requirements: at most ``maximum``, signed for the devchain's upto batcher."""
    return PaymentRequirements(
        scheme="upto",
        network=NETWORK,
        asset=dev.token,
        amount=str(maximum),
        pay_to=dev.payee,
        max_timeout_seconds=300,
        extra={"name": "USD Coin", "version": "2", "facilitatorAddress": dev.upto_batcher},
    )


def _pay(client: x402ClientSync, req: PaymentRequirements) -> PaymentPayload:
    payload = client.create_payment_payload(PaymentRequired(accepts=[req]))
    assert isinstance(payload, PaymentPayload)
    return payload


def test_sdk_permit2_exact_payloads_verify_and_settle_in_batches(tmp_path: Path) -> None:
    with running_service(tmp_path, payers=6) as svc:
        dev = svc.dev
        facilitator = HTTPFacilitatorClientSync(FacilitatorConfig(url=svc.url, timeout=60.0))
        kinds = facilitator.get_supported().kinds
        exact = [k for k in kinds if k.scheme == "exact" and k.network == NETWORK]
        assert exact and (exact[0].extra or {})["assetTransferMethods"] == ["eip3009", "permit2"]

        # Without the one-time approval Permit2 cannot move the payer's tokens: refused.
        unapproved = _client(dev.payer_keys[5])
        refused = facilitator.verify(_pay(unapproved, _exact(svc, 1000)), _exact(svc, 1000))
        assert not refused.is_valid and refused.invalid_reason == "permit2_allowance_required"

        gas = on_chain(
            svc, lambda rpc: approve_permit2(rpc, dev.chain_id, dev.token, dev.payer_keys[:5])
        )
        assert gas > 0
        payers = [_address(k) for k in dev.payer_keys[:5]]
        before = _balances(svc, [dev.payee, *payers])

        # One payment, verified then settled, then presented again.
        client = _client(dev.payer_keys[0])
        req = _exact(svc, 1000)
        payload = _pay(client, req)
        assert "permit2Authorization" in payload.payload
        verified = facilitator.verify(payload, req)
        assert verified.is_valid, verified
        assert (verified.payer or "").lower() == payers[0]
        settled = facilitator.settle(payload, req)
        assert settled.success, settled
        again = facilitator.settle(payload, req)
        assert not again.success and again.error_reason == "duplicate_settlement", again
        assert again.transaction == settled.transaction

        # Refusals in the reference facilitator's codes.
        other = _pay(client, req)
        assert (
            facilitator.verify(other, _exact(svc, 999)).invalid_reason == "permit2_amount_mismatch"
        )
        elsewhere = req.model_copy(update={"pay_to": payers[1]})
        mismatch = facilitator.verify(other, elsewhere)
        assert mismatch.invalid_reason == "invalid_permit2_recipient_mismatch"
        forged = other.model_copy(deep=True)
        forged.payload["permit2Authorization"]["permitted"]["amount"] = "1001"
        bad_sig = facilitator.verify(forged, _exact(svc, 1001))
        assert bad_sig.invalid_reason == "invalid_permit2_signature", bad_sig

        # Concurrent settles of Permit2 and EIP-3009 payments share a few transactions.
        eip3009 = req.model_copy(update={"extra": {"name": "USD Coin", "version": "2"}})
        jobs = [(_client(dev.payer_keys[i % 5]), req if i % 3 else eip3009) for i in range(30)]
        payloads = [(_pay(c, r), r) for c, r in jobs]
        with ThreadPoolExecutor(max_workers=30) as pool:
            answers = list(pool.map(lambda pr: facilitator.settle(*pr), payloads))
        assert all(a.success for a in answers), [a for a in answers if not a.success]
        transactions = {a.transaction for a in answers}
        assert len(transactions) <= 10, len(transactions)  # batched, not one each

        after = _balances(svc, [dev.payee, *payers])
        assert after[0] - before[0] == 31 * 1000
        assert sum(before[1:]) - sum(after[1:]) == 31 * 1000


def test_sdk_upto_payload_settles_the_amount_used(tmp_path: Path) -> None:
    with running_service(tmp_path, payers=2) as svc:
        dev = svc.dev
        facilitator = HTTPFacilitatorClientSync(FacilitatorConfig(url=svc.url, timeout=60.0))
        [upto] = [k for k in facilitator.get_supported().kinds if k.scheme == "upto"]
        assert upto.extra == {"facilitatorAddress": dev.upto_batcher}
        on_chain(svc, lambda rpc: approve_permit2(rpc, dev.chain_id, dev.token, dev.payer_keys))
        payer = _address(dev.payer_keys[0])
        before = _balances(svc, [dev.payee, payer])

        maximum = _upto(dev, 5000)
        client = _client(dev.payer_keys[0])
        payload = _pay(client, maximum)
        assert payload.payload["permit2Authorization"]["witness"]["facilitator"]
        verified = facilitator.verify(payload, maximum)
        assert verified.is_valid, verified
        used = maximum.model_copy(update={"amount": "1234"})
        settled = facilitator.settle(payload, used)
        assert settled.success, settled
        again = facilitator.settle(payload, used)
        assert not again.success and again.error_reason == "duplicate_settlement"
        after = _balances(svc, [dev.payee, payer])
        assert after[0] - before[0] == 1234 and before[1] - after[1] == 1234

        # More than the payer allowed, or signed for another facilitator: refused.
        second = _pay(client, maximum)
        too_much = facilitator.settle(second, maximum.model_copy(update={"amount": "5001"}))
        assert not too_much.success
        assert too_much.error_reason == "invalid_upto_evm_payload_settlement_exceeds_amount"
        stranger = maximum.model_copy(
            update={"extra": {**(maximum.extra or {}), "facilitatorAddress": payer}}
        )
        foreign = facilitator.verify(_pay(client, stranger), maximum)
        assert foreign.invalid_reason == "upto_facilitator_mismatch", foreign


async def test_many_upto_payments_of_one_payer_settle_in_one_sweep(tmp_path: Path) -> None:
    """Metered use: each request is an upto permit for at most 5,000, sold at once (deferred)
    for what was used, and the day's permits settle together when the window is swept."""
    import msgspec

    from engine.config import PolicyConfig, ServiceConfig
    from engine.dev.devchain import Anvil, engine_config, setup_devchain
    from engine.engine import Engine

    with Anvil() as anvil:
        dev = await setup_devchain(anvil.url, payers=1)
        config, env = engine_config(
            dev,
            str(tmp_path / "ledger.duckdb"),
            policy=PolicyConfig(mode="windowed", window_s=86_400),
        )
        config = msgspec.structs.replace(config, service=ServiceConfig(settlement="deferred"))
        rpc = Rpc(anvil.url)
        await approve_permit2(rpc, dev.chain_id, dev.token, dev.payer_keys)
        [before] = await balances(rpc, dev.token, [dev.payee])
        client = _client(dev.payer_keys[0])
        maximum = _upto(dev, 5000)
        used = [100 * (i + 1) for i in range(12)]
        async with Engine.open(config, environ=env) as engine:
            for amount in used:
                payload = _pay(client, maximum).model_dump(by_alias=True, exclude_none=True)
                req = maximum.model_copy(update={"amount": str(amount)})
                answer = await engine.settle(
                    payload, req.model_dump(by_alias=True, exclude_none=True)
                )
                assert answer.success and answer.transaction == "", answer  # sold, not yet sent
            assert engine.statistics().settled == 0
            assert engine.settle_now() == len(used)
            await engine.drain(timeout_s=60)
            stats = engine.statistics()
            assert stats.settled == len(used) and stats.batches_mined == 1
            modes = await engine.query("SELECT DISTINCT mode FROM batches")
            assert modes == [("upto",)]
        [after] = await balances(rpc, dev.token, [dev.payee])
        await rpc.aclose()
        assert after - before == sum(used)


def _ts_signed(svc: RunningService, key: str, amount: int, method: str) -> dict[str, Any]:
    """A facilitator request body signed by the official TypeScript SDK (tests/ts/sign.mjs)."""
    import json
    import subprocess

    dev = svc.dev
    args = [key, dev.token, dev.payee, str(amount), str(dev.chain_id), method]
    signed = subprocess.run(
        ["node", str(Path(__file__).parent / "ts" / "sign.mjs"), *args, dev.upto_batcher],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    body: dict[str, Any] = json.loads(signed.stdout)
    return body


def test_typescript_sdk_permit2_and_upto_payloads_settle(tmp_path: Path) -> None:
    import httpx

    with running_service(tmp_path, payers=1) as svc:
        dev = svc.dev
        on_chain(svc, lambda rpc: approve_permit2(rpc, dev.chain_id, dev.token, dev.payer_keys))
        [before] = _balances(svc, [dev.payee])
        exact = _ts_signed(svc, dev.payer_keys[0], 1000, "permit2")
        assert "permit2Authorization" in exact["paymentPayload"]["payload"]
        upto = _ts_signed(svc, dev.payer_keys[0], 5000, "upto")
        for body in (exact, upto):
            verified = httpx.post(svc.url + "/verify", json=body).json()
            assert verified["isValid"] is True, verified
        upto["paymentRequirements"]["amount"] = "777"  # the amount used, under the maximum
        for body in (exact, upto):
            settled = httpx.post(svc.url + "/settle", json=body, timeout=60).json()
            assert settled["success"] is True, settled
        [after] = _balances(svc, [dev.payee])
        assert after - before == 1000 + 777


async def test_the_engine_refuses_to_start_without_permit2_on_chain(tmp_path: Path) -> None:
    from engine.dev.devchain import Anvil, engine_config, setup_devchain
    from engine.engine import Engine
    from engine.model import ChainMismatch

    with Anvil() as anvil:
        dev = await setup_devchain(anvil.url, payers=1, with_permit2=False)
        config, env = engine_config(dev, str(tmp_path / "ledger.duckdb"), permit2=True)
        with pytest.raises(BaseException) as caught:
            async with Engine.open(config, environ=env):
                pass
        leaf: BaseException = caught.value
        while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
            leaf = leaf.exceptions[0]
        assert isinstance(leaf, ChainMismatch) and "no Permit2" in str(leaf), leaf
