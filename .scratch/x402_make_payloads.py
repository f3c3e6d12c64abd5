"""Build x402 v2 and v1 `exact` EVM payment payloads with the official SDK (x402==2.25.0).

Run: .venv/bin/python .scratch/x402_make_payloads.py
Prints {"v2": <verify/settle body>, "v1": <verify/settle body>} as JSON, i.e. exactly what
HTTPFacilitatorClient would POST to /verify and /settle (see x402_facilitator_client_probe.py).
"""

from __future__ import annotations

import json

from eth_account import Account

from x402 import x402ClientSync
from x402.mechanisms.evm.exact import ExactEvmScheme  # client-side scheme (v2)
from x402.mechanisms.evm.exact.v1.client import ExactEvmSchemeV1  # client-side scheme (v1)
from x402.mechanisms.evm.signers import EthAccountSigner
from x402.mechanisms.evm.v1.constants import V1_NETWORK_CHAIN_IDS
from x402.schemas import (
    PaymentRequired,
    PaymentRequiredV1,
    PaymentRequirements,
    PaymentRequirementsV1,
)

TOKEN = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
PAY_TO = "0x70997970C51812dc3A65C0dd76A14Aaf5C2B5Ed2"
NETWORK_V2 = "eip155:31337"
NETWORK_V1 = "anvil"  # any name, once mapped to the chain id below
EXTRA = {"name": "USD Coin", "version": "2"}

# v1 only knows hard-coded legacy names (base, base-sepolia, ...) -> chain id. There is no
# "eip155:31337" in v1; the chain id for the EIP-712 domain comes from this dict, so a custom
# chain needs an entry (module-level dict, shared by every importer).
V1_NETWORK_CHAIN_IDS[NETWORK_V1] = 31337


def make_client(account) -> x402ClientSync:
    signer = EthAccountSigner(account)  # ExactEvmScheme(account) also auto-wraps a LocalAccount
    client = x402ClientSync()
    client.register(NETWORK_V2, ExactEvmScheme(signer))  # or "eip155:*"
    client.register_v1(NETWORK_V1, ExactEvmSchemeV1(signer))
    # Spend controls default to "only SDK-known default assets, <= $1": a custom token is
    # rejected with NoMatchingRequirementsError unless disabled or allow-listed, e.g.
    # client.set_spend_controls({"allowed_assets": [{"network": NETWORK_V2, "asset": TOKEN}]})
    client.set_spend_controls(False)
    return client


def v2_body(client: x402ClientSync, amount: str = "1000") -> dict:
    req = PaymentRequirements(
        scheme="exact",
        network=NETWORK_V2,
        asset=TOKEN,
        amount=amount,
        pay_to=PAY_TO,
        max_timeout_seconds=300,
        extra=dict(EXTRA),
    )
    payload = client.create_payment_payload(PaymentRequired(accepts=[req]))
    return {
        "x402Version": 2,
        "paymentPayload": payload.model_dump(by_alias=True, exclude_none=True),
        "paymentRequirements": req.model_dump(by_alias=True, exclude_none=True),
    }


def v1_body(client: x402ClientSync, amount: str = "1000") -> dict:
    req = PaymentRequirementsV1(
        scheme="exact",
        network=NETWORK_V1,
        max_amount_required=amount,
        resource="http://127.0.0.1/paid",
        pay_to=PAY_TO,
        max_timeout_seconds=300,
        asset=TOKEN,
        extra=dict(EXTRA),
    )
    payload = client.create_payment_payload(PaymentRequiredV1(accepts=[req]))
    return {
        "x402Version": 1,
        "paymentPayload": payload.model_dump(by_alias=True, exclude_none=True),
        "paymentRequirements": req.model_dump(by_alias=True, exclude_none=True),
    }


def main() -> None:
    account = Account.create()
    client = make_client(account)
    out = {"payer": account.address, "v2": v2_body(client), "v1": v1_body(client)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
