"""The official x402 SDK's client side, as the interoperability tests use it on a devchain:
a client for a payer key, and the devchain's v2 and v1 payment requirements."""

from __future__ import annotations

from eth_account import Account
from x402 import x402ClientSync
from x402.mechanisms.evm.exact import ExactEvmScheme
from x402.mechanisms.evm.exact.v1.client import ExactEvmSchemeV1
from x402.mechanisms.evm.signers import EthAccountSigner
from x402.schemas import PaymentRequirements, PaymentRequirementsV1

from engine.dev.devchain import DevChain

NETWORK = "eip155:31337"
V1_NETWORK = "anvil"  # the devchain's v1 name (the SDK's v1 client needs it in its table)
DOMAIN = {"name": "USD Coin", "version": "2"}


def sdk_client(key: str) -> x402ClientSync:
    """The SDK's client paying from ``key``: exact EVM on the devchain, v2 and v1."""
    signer = EthAccountSigner(Account.from_key(key))
    client = x402ClientSync()
    client.register(NETWORK, ExactEvmScheme(signer))
    client.register_v1(V1_NETWORK, ExactEvmSchemeV1(signer))
    client.set_spend_controls(False)  # the devchain's token is not one of the SDK's assets
    return client


def v2_requirements(
    dev: DevChain, amount: int, extra: dict[str, str] | None = None
) -> PaymentRequirements:
    """``exact`` on the devchain's token; ``extra`` defaults to its EIP-712 domain."""
    return PaymentRequirements(
        scheme="exact",
        network=NETWORK,
        asset=dev.token,
        amount=str(amount),
        pay_to=dev.payee,
        max_timeout_seconds=300,
        extra=DOMAIN if extra is None else extra,
    )


def v1_requirements(dev: DevChain, amount: int) -> PaymentRequirementsV1:
    return PaymentRequirementsV1(
        scheme="exact",
        network=V1_NETWORK,
        max_amount_required=str(amount),
        resource="http://127.0.0.1/paid",
        pay_to=dev.payee,
        max_timeout_seconds=300,
        asset=dev.token,
        extra=DOMAIN,
    )
