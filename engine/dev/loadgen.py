"""Signed x402 payments for demos, tests and benchmarks.

Signing uses coincurve on a hand-built EIP-712 digest (~10x eth_account's typed-data signing),
so generating a workload never dominates a measurement.
"""

from __future__ import annotations

import os
from typing import Any

import msgspec

from ..chain import crypto, permit2
from ..model import (
    EXACT_PERMIT2_PROXY,
    PERMIT2_EXACT,
    ExactEvmPayload,
    Payment,
    PaymentPayloadV1,
    PaymentPayloadV2,
    RequirementsV1,
    RequirementsV2,
    WireAuthorization,
    WirePermit2Authorization,
    WirePermitted,
    WireWitness,
    hex_addr,
)


class TokenDomain(msgspec.Struct, frozen=True):
    chain_id: int
    address: bytes
    name: str
    version: str

    @property
    def separator(self) -> bytes:
        return crypto.domain_separator(self.name, self.version, self.chain_id, self.address)


def requirements_v2(domain: TokenDomain, payee: bytes, amount: int) -> RequirementsV2:
    return RequirementsV2(
        scheme="exact",
        network=f"eip155:{domain.chain_id}",
        amount=str(amount),
        asset=hex_addr(domain.address),
        pay_to=hex_addr(payee),
        max_timeout_seconds=300,
        extra={"name": domain.name, "version": domain.version},
    )


def requirements_v1(domain: TokenDomain, payee: bytes, amount: int, network: str) -> RequirementsV1:
    return RequirementsV1(
        scheme="exact",
        network=network,
        max_amount_required=str(amount),
        asset=hex_addr(domain.address),
        pay_to=hex_addr(payee),
        resource="http://127.0.0.1/resource",
        max_timeout_seconds=300,
        extra={"name": domain.name, "version": domain.version},
    )


def sign_authorization(
    domain: TokenDomain,
    payer_key: bytes,
    payee: bytes,
    value: int,
    valid_after: int,
    valid_before: int,
    nonce: bytes | None = None,
    separator: bytes | None = None,
) -> ExactEvmPayload:
    payer = crypto.private_key_address(payer_key)
    nonce = os.urandom(32) if nonce is None else nonce
    digest = crypto.transfer_digest(
        separator or domain.separator, payer, payee, value, valid_after, valid_before, nonce
    )
    signature = crypto.sign_digest(payer_key, digest)
    return ExactEvmPayload(
        signature="0x" + signature.hex(),
        authorization=WireAuthorization(
            from_=hex_addr(payer),
            to=hex_addr(payee),
            value=str(value),
            valid_after=str(valid_after),
            valid_before=str(valid_before),
            nonce="0x" + nonce.hex(),
        ),
    )


def payment_v2(
    domain: TokenDomain,
    payer_key: bytes,
    payee: bytes,
    value: int,
    now: int,
    *,
    valid_for_s: int = 3600,
    nonce: bytes | None = None,
    separator: bytes | None = None,
) -> tuple[PaymentPayloadV2, RequirementsV2]:
    req = requirements_v2(domain, payee, value)
    payload = sign_authorization(
        domain, payer_key, payee, value, now - 60, now + valid_for_s, nonce, separator
    )
    return PaymentPayloadV2(accepted=req, payload=payload), req


def payment_permit2_v2(
    domain: TokenDomain, payer_key: bytes, payee: bytes, value: int, now: int
) -> tuple[PaymentPayloadV2, RequirementsV2]:
    """An x402 v2 ``exact`` payment with assetTransferMethod "permit2", as the official clients
    sign it (spender the x402 exact proxy, validAfter 0, the deadline 5 minutes on)."""
    req = requirements_v2(domain, payee, value)
    req = msgspec.structs.replace(
        req, extra={**(req.extra or {}), "assetTransferMethod": "permit2"}
    )
    payer = crypto.private_key_address(payer_key)
    nonce = os.urandom(32)
    deadline = now + 300
    unsigned = Payment(
        chain_id=domain.chain_id,
        token=domain.address,
        payer=payer,
        payee=payee,
        value=value,
        valid_after=0,
        valid_before=deadline,
        nonce=nonce,
        signature=b"",
        network=req.network,
        x402_version=2,
        method=PERMIT2_EXACT,
        permitted=value,
    )
    digest = permit2.digest(permit2.domain_separator(domain.chain_id), unsigned)
    payload = ExactEvmPayload(
        signature="0x" + crypto.sign_digest(payer_key, digest).hex(),
        permit2_authorization=WirePermit2Authorization(
            from_=hex_addr(payer),
            permitted=WirePermitted(token=hex_addr(domain.address), amount=str(value)),
            spender=hex_addr(EXACT_PERMIT2_PROXY),
            nonce=str(int.from_bytes(nonce, "big")),
            deadline=str(deadline),
            witness=WireWitness(to=hex_addr(payee), valid_after="0"),
        ),
    )
    return PaymentPayloadV2(accepted=req, payload=payload), req


def payment_v1(
    domain: TokenDomain,
    payer_key: bytes,
    payee: bytes,
    value: int,
    now: int,
    network: str,
    *,
    valid_for_s: int = 3600,
) -> tuple[PaymentPayloadV1, RequirementsV1]:
    req = requirements_v1(domain, payee, value, network)
    payload = sign_authorization(domain, payer_key, payee, value, now - 60, now + valid_for_s)
    return PaymentPayloadV1(scheme="exact", network=network, payload=payload), req


def to_json(obj: Any) -> bytes:
    return msgspec.json.encode(obj)
