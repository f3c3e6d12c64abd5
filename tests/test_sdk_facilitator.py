"""benchmarks/sdk_facilitator.py: the official SDK's facilitator behind our minimal HTTP front,
on a real anvil with the devchain, paid by the SDK's own client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from eth_account import Account
from eth_utils.address import to_checksum_address
from x402 import x402ClientSync
from x402.http import FacilitatorConfig, HTTPFacilitatorClientSync
from x402.mechanisms.evm.exact import ExactEvmScheme
from x402.mechanisms.evm.exact.v1.client import ExactEvmSchemeV1
from x402.mechanisms.evm.signers import EthAccountSigner
from x402.mechanisms.evm.v1.constants import V1_NETWORK_CHAIN_IDS
from x402.schemas import (
    PaymentRequired,
    PaymentRequiredV1,
    PaymentRequirements,
    PaymentRequirementsV1,
)

from benchmarks.sdk_facilitator import (
    ANVIL_ACCOUNT_0,
    ANVIL_ACCOUNT_0_KEY,
    sdk_facilitator,
    sdk_facilitator_key,
)
from engine.chain.rpc import Rpc
from engine.dev.devchain import ANVIL_CHAIN_ID, Anvil, DevChain, setup_devchain, token_balance

pytestmark = pytest.mark.chain
ROOT = Path(__file__).resolve().parent.parent
DOMAIN = {"name": "USD Coin", "version": "2"}


def _rpc(url: str, method: str, params: list[Any]) -> Any:
    async def call() -> Any:
        rpc = Rpc(url)
        try:
            return await rpc.call(method, params)
        finally:
            await rpc.aclose()

    return trio.run(call)


def _balance(dev: DevChain, owner: str) -> int:
    async def read() -> int:
        rpc = Rpc(dev.rpc_url)
        try:
            return await token_balance(rpc, dev.token, owner)
        finally:
            await rpc.aclose()

    return trio.run(read)


def _client(key: str) -> x402ClientSync:
    signer = EthAccountSigner(Account.from_key(key))
    client = x402ClientSync()
    client.register(f"eip155:{ANVIL_CHAIN_ID}", ExactEvmScheme(signer))
    client.register_v1("anvil", ExactEvmSchemeV1(signer))
    client.set_spend_controls(False)  # the devchain's token is not one of the SDK's assets
    return client


def _v2_body(dev: DevChain, payer_key: str, amount: int) -> bytes:
    """A facilitator request body as the SDK's HTTP facilitator client sends it. ``payTo`` is
    checksummed: the SDK's client copies it into the authorization's ``to`` as given, and the
    SDK's facilitator fails verify on a lowercase ``to`` (web3 wants checksummed addresses)."""
    requirements = PaymentRequirements(
        scheme="exact",
        network=f"eip155:{dev.chain_id}",
        asset=dev.token,
        amount=str(amount),
        pay_to=to_checksum_address(dev.payee),
        max_timeout_seconds=300,
        extra=DOMAIN,
    )
    payload = _client(payer_key).create_payment_payload(PaymentRequired(accepts=[requirements]))
    return json.dumps(
        {
            "x402Version": 2,
            "paymentPayload": payload.model_dump(mode="json", by_alias=True, exclude_none=True),
            "paymentRequirements": requirements.model_dump(
                mode="json", by_alias=True, exclude_none=True
            ),
        }
    ).encode()


def test_sdk_facilitator_verifies_and_settles_sdk_client_payments(anvil: Anvil) -> None:
    dev = trio.run(lambda: setup_devchain(anvil.url, payers=6, with_permit2=False))
    key = sdk_facilitator_key(dev)
    # anvil's account 0: funded by anvil itself, and none of the devchain's accounts
    assert Account.from_key(key).address == ANVIL_ACCOUNT_0
    assert [a.lower() for a in _rpc(anvil.url, "eth_accounts", [])] == [ANVIL_ACCOUNT_0.lower()]
    assert int(_rpc(anvil.url, "eth_getBalance", [ANVIL_ACCOUNT_0, "latest"]), 16) > 0
    assert "anvil" not in V1_NETWORK_CHAIN_IDS

    with sdk_facilitator(anvil.url, dev.chain_id, key, v1_networks=["anvil"]) as url:
        http = httpx.Client(base_url=url, timeout=60)
        supported = http.get("/supported")
        assert supported.status_code == 200
        kinds = {(k["x402Version"], k["scheme"], k["network"]) for k in supported.json()["kinds"]}
        assert {(2, "exact", f"eip155:{dev.chain_id}"), (1, "exact", "anvil")} <= kinds
        assert supported.json()["signers"] == {"eip155:*": [ANVIL_ACCOUNT_0]}

        payer = Account.from_key(dev.payer_keys[0]).address
        body = _v2_body(dev, dev.payer_keys[0], 1234)
        verified = http.post("/verify", content=body)
        assert verified.status_code == 200
        assert verified.json() == {"isValid": True, "payer": payer}

        before = _balance(dev, dev.payee)
        settled = http.post("/settle", content=body)
        assert settled.status_code == 200
        answer = settled.json()
        assert answer["success"] is True, answer
        assert answer["transaction"].startswith("0x") and len(answer["transaction"]) == 66
        assert answer["network"] == f"eip155:{dev.chain_id}" and answer["payer"] == payer
        receipt = _rpc(anvil.url, "eth_getTransactionReceipt", [answer["transaction"]])
        assert receipt["from"].lower() == ANVIL_ACCOUNT_0.lower()
        assert _balance(dev, dev.payee) - before == 1234

        # the same payment again: the SDK refuses (not an HTTP error) and nothing moves. Its
        # settle does not re-simulate (simulate_in_settle=False), so it broadcasts the used
        # authorization and reports the on-chain revert, with the reverted transaction's hash.
        again = http.post("/settle", content=body)
        assert again.status_code == 200
        refused = again.json()
        assert refused["success"] is False, refused
        assert refused["errorReason"] == "transaction_failed", refused
        reverted = _rpc(anvil.url, "eth_getTransactionReceipt", [refused["transaction"]])
        assert int(reverted["status"], 16) == 0
        assert _balance(dev, dev.payee) - before == 1234
        replay = http.post("/verify", content=body).json()
        assert replay["isValid"] is False, replay
        assert replay["invalidReason"] == "invalid_exact_evm_nonce_already_used", replay

        # concurrent settles from several payers: the SDK signer reserves nonces under a lock
        bodies = [_v2_body(dev, k, 100) for k in dev.payer_keys[1:5]]
        answers: list[Any] = [None] * len(bodies)

        def settle(i: int) -> None:
            answers[i] = httpx.post(url + "/settle", content=bodies[i], timeout=60).json()

        threads = [threading.Thread(target=settle, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(a["success"] is True for a in answers), answers
        assert len({a["transaction"] for a in answers}) == len(bodies)
        assert _balance(dev, dev.payee) - before == 1234 + 400

        # v1, through the SDK's own HTTP facilitator client (it reads our answers)
        v1_req = PaymentRequirementsV1(
            scheme="exact",
            network="anvil",
            max_amount_required="2000",
            resource="http://127.0.0.1/paid",
            pay_to=to_checksum_address(dev.payee),
            max_timeout_seconds=300,
            asset=dev.token,
            extra=DOMAIN,
        )
        v1_payload = _client(dev.payer_keys[5]).create_payment_payload(
            PaymentRequiredV1(accepts=[v1_req])
        )
        sdk_http = HTTPFacilitatorClientSync(FacilitatorConfig(url=url, timeout=60.0))
        assert sdk_http.verify(v1_payload, v1_req).is_valid
        v1_settled = sdk_http.settle(v1_payload, v1_req)
        assert v1_settled.success and v1_settled.network == "anvil", v1_settled
        assert _balance(dev, dev.payee) - before == 1234 + 400 + 2000

        # bodies that are not facilitator requests
        for bad in (
            b"{not json",
            b"[]",
            b"{}",
            json.dumps({"x402Version": 3, "paymentPayload": {}, "paymentRequirements": {}}),
            json.dumps({**json.loads(body), "paymentRequirements": {"scheme": "exact"}}),
        ):
            malformed = http.post("/verify", content=bad)
            assert malformed.status_code == 400, (bad, malformed.text)
            assert isinstance(malformed.json()["error"], str)
        # another eip155 chain: the SDK's registration covers eip155:* and its scheme refuses
        other_chain = json.loads(body)
        other_chain["paymentPayload"]["accepted"]["network"] = "eip155:1"
        mismatch = http.post("/verify", content=json.dumps(other_chain))
        assert mismatch.status_code == 200, mismatch.text
        assert mismatch.json()["invalidReason"] == "network_mismatch"
        # parses, but no scheme is registered for the network family: the SDK raises
        unknown = json.loads(body)
        unknown["paymentPayload"]["accepted"]["network"] = "solana:devnet"
        failed = http.post("/verify", content=json.dumps(unknown))
        assert failed.status_code == 500 and failed.json()["error"], failed.text
        assert http.get("/nothing").status_code == 404
        http.close()
    assert "anvil" not in V1_NETWORK_CHAIN_IDS  # the process-wide v1 name is removed again


def test_sdk_facilitator_command_serves_until_sigterm(anvil: Anvil, tmp_path: Path) -> None:
    # a plain anvil (no devchain): nothing else sends from its account 0 either
    env_file = tmp_path / "sdk.env"
    env_file.write_text(f"X402_SDK_FACILITATOR_KEY={ANVIL_ACCOUNT_0_KEY}\n")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "benchmarks.sdk_facilitator",
            "--rpc-url",
            anvil.url,
            "--chain-id",
            str(anvil.chain_id),
            "--key-env",
            "X402_SDK_FACILITATOR_KEY",
            "--env-file",
            str(env_file),
            "--bind",
            "127.0.0.1:0",
        ],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "X402_SDK_FACILITATOR_KEY"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        line = process.stdout.readline()
        assert line.startswith("sdk facilitator listening on http://127.0.0.1:"), (
            line or process.stderr.read()
        )
        assert f"(signer {ANVIL_ACCOUNT_0}, chain {anvil.chain_id})" in line
        url = line.split()[4]
        kinds = httpx.get(url + "/supported", timeout=10).json()["kinds"]
        assert {"x402Version": 2, "scheme": "exact", "network": "eip155:31337"} in kinds
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
