"""Reference rate: the official x402 SDK's facilitator-side verify on our pre-signed payloads.

    rate = sdk_verify_rate(rpc_url, chain_id, facilitator_key, bodies)

``bodies`` are facilitator request bodies (``{"x402Version": 2, "paymentPayload": ...,
"paymentRequirements": ...}``), the same bytes the engine ingests. The SDK is wired the way its
documentation shows: an ``x402FacilitatorSync`` with the exact EVM facilitator scheme registered
for ``eip155:<chain_id>`` through ``register_exact_evm_facilitator``, backed by a
``FacilitatorWeb3Signer`` (web3 over HTTP to ``rpc_url``). Each body is parsed with the SDK's
pydantic models and verified in turn, on one thread, as the SDK's facilitator does per request.

Per EOA payment the SDK's verify recovers the EIP-712 signer locally and makes four sequential
RPC calls: ``eth_getCode`` on the payer (EOA vs smart-wallet routing) and an ``eth_call``
simulating ``transferWithAuthorization`` from the facilitator address, which web3 8 brackets with
two ``eth_chainId`` calls. The asset's ``eth_getCode`` is cached process-wide after the first
verify (one untimed warm-up verify absorbs it and the connection set-up). Verify is read-only, so
the warm-up does not consume the payment it checks.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

from eth_utils.address import to_checksum_address
from x402 import x402FacilitatorSync
from x402.mechanisms.evm import FacilitatorWeb3Signer
from x402.mechanisms.evm.exact import register_exact_evm_facilitator
from x402.schemas import PaymentPayload, PaymentRequirements, VerifyResponse


def build_sdk_facilitator(
    rpc_url: str, chain_id: int, facilitator_key: str
) -> tuple[x402FacilitatorSync, FacilitatorWeb3Signer]:
    """The SDK's synchronous facilitator for ``eip155:<chain_id>``, talking only to ``rpc_url``."""
    signer = FacilitatorWeb3Signer(private_key=facilitator_key, rpc_url=rpc_url)
    connected = signer.get_chain_id()
    if connected != chain_id:
        raise ValueError(f"{rpc_url} serves chain {connected}, not {chain_id}")
    facilitator = x402FacilitatorSync()
    register_exact_evm_facilitator(facilitator, signer, networks=f"eip155:{chain_id}")
    return facilitator, signer


def parse_body(body: bytes) -> tuple[PaymentPayload, PaymentRequirements]:
    """A facilitator request body as the SDK's own (camelCase-aliased) pydantic models."""
    obj = json.loads(body)
    if not isinstance(obj, dict) or obj.get("x402Version") != 2:
        raise ValueError("not an x402 v2 facilitator request")
    payload = PaymentPayload.model_validate(obj["paymentPayload"])
    requirements = PaymentRequirements.model_validate(obj["paymentRequirements"])
    return payload, requirements


def sdk_wire_form(body: bytes) -> bytes:
    """``body`` with the authorization's ``from``/``to`` in EIP-55 checksum case (as the SDK's
    own client sends them); everything else is unchanged and the signature stays valid (EIP-712
    encodes addresses as 20 bytes, not as text).

    The SDK's facilitator passes these two strings unchanged into web3 contract-call arguments
    for its ``transferWithAuthorization`` simulation, and web3 rejects lowercase addresses
    there, so every payload with lowercase addresses (ours) fails verify with
    ``invalid_exact_evm_transaction_simulation_failed``. Bodies that do not parse are returned
    as they are (verify then reports them)."""
    try:
        obj = json.loads(body)
        authorization = obj["paymentPayload"]["payload"]["authorization"]
        for field in ("from", "to"):
            authorization[field] = to_checksum_address(authorization[field])
    except Exception:
        return body
    return json.dumps(obj, separators=(",", ":")).encode()


def _verify_one(facilitator: x402FacilitatorSync, body: bytes) -> str | None:
    """None if the SDK accepts ``body``, else why not (its invalid reason or the failure)."""
    try:
        payload, requirements = parse_body(body)
    except Exception as exc:
        return f"parse_error:{type(exc).__name__}"
    try:
        result: VerifyResponse = facilitator.verify(payload, requirements)
    except Exception as exc:
        return f"exception:{type(exc).__name__}"
    if result.is_valid:
        return None
    return result.invalid_reason or "invalid"


def sdk_verify_rate(
    rpc_url: str,
    chain_id: int,
    facilitator_key: str,
    bodies: list[bytes],
    seconds_max: float = 20.0,
) -> dict[str, Any]:
    """Verify ``bodies`` one after another with the SDK until all are done or ``seconds_max``
    has elapsed; the rate counts every attempted body (valid or not) per second."""
    facilitator, _ = build_sdk_facilitator(rpc_url, chain_id, facilitator_key)
    bodies = [sdk_wire_form(body) for body in bodies]  # untimed: workload shape, not verify
    if bodies:
        _verify_one(facilitator, bodies[0])  # warm-up: connection, asset-code cache
    reasons: Counter[str] = Counter()
    verified = 0
    attempted = 0
    start = time.perf_counter()
    for body in bodies:
        if time.perf_counter() - start >= seconds_max:
            break
        reason = _verify_one(facilitator, body)
        attempted += 1
        if reason is None:
            verified += 1
        else:
            reasons[reason] += 1
    elapsed = time.perf_counter() - start
    return {
        "verified": verified,
        "attempted": attempted,
        "seconds": elapsed,
        "rate_per_s": attempted / elapsed if elapsed > 0 else 0.0,
        "invalid_reasons": dict(reasons),
    }
