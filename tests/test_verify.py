"""Ingest checks: each x402 reason code for each kind of bad input, v1 and v2."""

from __future__ import annotations

import msgspec
import pytest

from engine.config import EngineConfig
from engine.dev.loadgen import TokenDomain, payment_v1, payment_v2, sign_authorization, to_json
from engine.model import Payment, Rejected
from engine.rules import reasons
from engine.stages.verify import Verifier

from .conftest import PAYEE


def _check(
    config: EngineConfig, payload: object, req: object, now: float
) -> tuple[Payment | None, Rejected | None]:
    return Verifier(config).check(payload, req, now)


def test_valid_v2_payment_is_accepted_from_bytes_dicts_and_structs(
    offline_config: EngineConfig, domain: TokenDomain, payer_key: bytes, payer: bytes, now: int
) -> None:
    payload, req = payment_v2(domain, payer_key, PAYEE, 1000, now)
    for p, r in [
        (payload, req),
        (to_json(payload), to_json(req)),
        (msgspec.to_builtins(payload), msgspec.to_builtins(req)),
    ]:
        payment, rejected = _check(offline_config, p, r, now)
        assert rejected is None
        assert payment is not None
        assert payment.payer == payer and payment.payee == PAYEE and payment.value == 1000
        assert payment.chain_id == 8453 and payment.x402_version == 2


def test_valid_v1_payment_with_network_name_is_accepted(
    offline_config: EngineConfig, domain: TokenDomain, payer_key: bytes, now: int
) -> None:
    payload, req = payment_v1(domain, payer_key, PAYEE, 5, now, "base")
    payment, rejected = _check(offline_config, to_json(payload), to_json(req), now)
    assert rejected is None and payment is not None and payment.x402_version == 1


def _tamper(payload_json: bytes, path: list[str], value: object) -> bytes:
    obj = msgspec.json.decode(payload_json)
    target = obj
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return msgspec.json.encode(obj)


@pytest.mark.parametrize(
    ("path", "value", "reason"),
    [
        (["payload", "authorization", "value"], "999", reasons.VALUE_MISMATCH),
        (["payload", "authorization", "to"], "0x" + "44" * 20, reasons.RECIPIENT_MISMATCH),
        (["payload", "authorization", "from"], "0x" + "55" * 20, reasons.SIGNATURE),
        (["payload", "authorization", "nonce"], "0x1234", reasons.INVALID_PAYLOAD),
        (["payload", "authorization", "value"], "-1", reasons.INVALID_PAYLOAD),
        (["payload", "authorization", "value"], "1e3", reasons.INVALID_PAYLOAD),
        (["payload", "signature"], "0x" + "00" * 65, reasons.SIGNATURE),
        (["payload", "signature"], "0xzz", reasons.INVALID_PAYLOAD),
        (["x402Version"], 3, reasons.INVALID_VERSION),
        (["payload"], "not an object", reasons.INVALID_PAYLOAD),
    ],
)
def test_tampered_payload_is_rejected_with_its_reason(
    offline_config: EngineConfig,
    domain: TokenDomain,
    payer_key: bytes,
    now: int,
    path: list[str],
    value: object,
    reason: str,
) -> None:
    payload, req = payment_v2(domain, payer_key, PAYEE, 1000, now)
    bad = _tamper(to_json(payload), path, value)
    payment, rejected = _check(_ecdsa_only(offline_config), bad, to_json(req), now)
    assert payment is None
    assert rejected is not None and rejected.reason == reason, rejected
    if reason == reasons.SIGNATURE:
        # with smart-wallet payers on (the default), a 65-byte signature that does not recover
        # to authorization.from is left to the chain (EIP-1271): marked, not refused
        payment, rejected = _check(offline_config, bad, to_json(req), now)
        assert payment is not None and rejected is not None
        assert rejected.reason == reasons.CONTRACT_SIGNATURE


def _ecdsa_only(config: EngineConfig) -> EngineConfig:
    ingest = msgspec.structs.replace(config.ingest, contract_signatures=False)
    return msgspec.structs.replace(config, ingest=ingest)


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("scheme", "upto", reasons.UNSUPPORTED_SCHEME),
        ("network", "eip155:1", reasons.INVALID_REQUIREMENTS),  # accepted != requirements
        ("asset", "0x" + "66" * 20, reasons.INVALID_REQUIREMENTS),
        ("payTo", "0x" + "77" * 20, reasons.RECIPIENT_MISMATCH),
        ("amount", "1001", reasons.VALUE_MISMATCH),
        ("amount", "ten", reasons.INVALID_REQUIREMENTS),
    ],
)
def test_mismatched_requirements_are_rejected(
    offline_config: EngineConfig,
    domain: TokenDomain,
    payer_key: bytes,
    now: int,
    field: str,
    value: str,
    reason: str,
) -> None:
    payload, req = payment_v2(domain, payer_key, PAYEE, 1000, now)
    bad_req = _tamper(to_json(req), [field], value)
    _, rejected = _check(offline_config, to_json(payload), bad_req, now)
    assert rejected is not None and rejected.reason == reason, rejected


def test_unknown_network_is_rejected(
    offline_config: EngineConfig, domain: TokenDomain, payer_key: bytes, now: int
) -> None:
    other = TokenDomain(1, domain.address, domain.name, domain.version)
    payload, req = payment_v2(other, payer_key, PAYEE, 1000, now)
    _, rejected = _check(offline_config, payload, req, now)
    assert rejected is not None and rejected.reason == reasons.INVALID_NETWORK


def test_time_window_is_enforced(
    offline_config: EngineConfig, domain: TokenDomain, payer_key: bytes, now: int
) -> None:
    req = payment_v2(domain, payer_key, PAYEE, 1000, now)[1]
    expiring = sign_authorization(domain, payer_key, PAYEE, 1000, now - 60, now + 5)
    future = sign_authorization(domain, payer_key, PAYEE, 1000, now + 100, now + 600)
    from engine.model import PaymentPayloadV2

    _, r1 = _check(offline_config, PaymentPayloadV2(accepted=req, payload=expiring), req, now)
    _, r2 = _check(offline_config, PaymentPayloadV2(accepted=req, payload=future), req, now)
    assert r1 is not None and r1.reason == reasons.VALID_BEFORE
    assert r2 is not None and r2.reason == reasons.VALID_AFTER


def test_signature_from_another_domain_is_rejected(
    offline_config: EngineConfig, domain: TokenDomain, payer_key: bytes, now: int
) -> None:
    wrong = TokenDomain(8453, domain.address, "USDC", "2")  # Base Sepolia's name
    payload, _ = payment_v2(wrong, payer_key, PAYEE, 1000, now)
    _, req = payment_v2(domain, payer_key, PAYEE, 1000, now)
    payload = msgspec.structs.replace(payload, accepted=req)
    _, rejected = _check(_ecdsa_only(offline_config), payload, req, now)
    assert rejected is not None and rejected.reason == reasons.SIGNATURE


def test_extra_domain_mismatch_is_rejected(
    offline_config: EngineConfig, domain: TokenDomain, payer_key: bytes, now: int
) -> None:
    payload, req = payment_v2(domain, payer_key, PAYEE, 1000, now)
    bad = _tamper(to_json(req), ["extra"], {"name": "USDC", "version": "2"})
    _, rejected = _check(offline_config, to_json(payload), bad, now)
    assert rejected is not None and rejected.reason == reasons.INVALID_REQUIREMENTS


def test_garbage_bytes_are_rejected_not_raised(offline_config: EngineConfig, now: int) -> None:
    for junk in [b"", b"{", b"[]", b"null", b'{"x402Version": 2}', "\x00" * 10]:
        payment, rejected = _check(offline_config, junk, b"{}", now)
        assert payment is None and rejected is not None


def test_only_the_eip3009_transfer_method_is_accepted(
    offline_config: EngineConfig, domain: TokenDomain, payer_key: bytes, now: int
) -> None:
    payload, req = payment_v2(domain, payer_key, PAYEE, 1000, now)
    ok = _tamper(
        to_json(req),
        ["extra"],
        {"name": "USD Coin", "version": "2", "assetTransferMethod": "eip3009"},
    )
    permit2 = _tamper(
        to_json(req),
        ["extra"],
        {"name": "USD Coin", "version": "2", "assetTransferMethod": "permit2"},
    )
    assert _check(offline_config, to_json(payload), ok, now)[1] is None
    _, rejected = _check(offline_config, to_json(payload), permit2, now)
    assert rejected is not None and rejected.reason == reasons.INVALID_REQUIREMENTS


@pytest.mark.parametrize(
    "text", ["01000", "001000", " 1000", "1000 ", "+1000", "1_000", "\uff11\uff10\uff10\uff10"]
)
def test_non_canonical_amounts_are_refused_in_authorization_and_requirements(
    offline_config: EngineConfig, domain: TokenDomain, payer_key: bytes, now: int, text: str
) -> None:
    payload, req = payment_v2(domain, payer_key, PAYEE, 1000, now)
    bad_auth = _tamper(to_json(payload), ["payload", "authorization", "value"], text)
    _, rejected = _check(offline_config, bad_auth, to_json(req), now)
    assert rejected is not None and rejected.reason == reasons.INVALID_PAYLOAD, rejected
    bad_amount = _tamper(to_json(req), ["amount"], text)
    _, rejected = _check(offline_config, to_json(payload), bad_amount, now)
    assert rejected is not None and rejected.reason == reasons.INVALID_REQUIREMENTS, rejected
    payload1, req1 = payment_v1(domain, payer_key, PAYEE, 1000, now, "base")
    bad_v1 = _tamper(to_json(req1), ["maxAmountRequired"], text)
    _, rejected = _check(offline_config, to_json(payload1), bad_v1, now)
    assert rejected is not None and rejected.reason == reasons.INVALID_REQUIREMENTS, rejected


def test_zero_value_is_refused_and_the_minimum_is_configurable(
    offline_config: EngineConfig, domain: TokenDomain, payer_key: bytes, now: int
) -> None:
    zero = payment_v2(domain, payer_key, PAYEE, 0, now)
    _, rejected = _check(offline_config, *zero, now)
    assert rejected is not None and rejected.reason == reasons.INVALID_REQUIREMENTS, rejected
    assert "minimum" in rejected.message
    strict = msgspec.structs.replace(
        offline_config, ingest=msgspec.structs.replace(offline_config.ingest, value_min=1000)
    )
    _, rejected = _check(strict, *payment_v2(domain, payer_key, PAYEE, 999, now), now)
    assert rejected is not None and rejected.reason == reasons.INVALID_REQUIREMENTS
    payment, rejected = _check(strict, *payment_v2(domain, payer_key, PAYEE, 1000, now), now)
    assert rejected is None and payment is not None and payment.value == 1000


def test_payer_is_reported_whenever_authorization_from_decodes(
    offline_config: EngineConfig, domain: TokenDomain, payer_key: bytes, payer: bytes, now: int
) -> None:
    payload, req = payment_v2(domain, payer_key, PAYEE, 1000, now)
    expected = "0x" + payer.hex()
    # requirements unreadable, payload fine
    _, rejected = _check(offline_config, to_json(payload), b'{"scheme": 5}', now)
    assert rejected is not None and rejected.payer == expected, rejected
    # payload unreadable as a whole (signature missing), but authorization.from is there
    broken = msgspec.json.decode(to_json(payload))
    del broken["payload"]["signature"]
    _, rejected = _check(offline_config, msgspec.json.encode(broken), to_json(req), now)
    assert rejected is not None and rejected.payer == expected, rejected
    # a malformed address is not reported as a payer
    odd = _tamper(to_json(payload), ["payload", "authorization", "from"], "0xnothex")
    _, rejected = _check(offline_config, odd, to_json(req), now)
    assert rejected is not None and rejected.payer is None, rejected
