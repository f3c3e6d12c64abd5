"""Ingest checks: decode an x402 ``exact`` (EIP-3009 or Permit2) or ``upto`` (Permit2) EVM
payment and verify it, with no I/O.

Order follows the reference facilitator: scheme → network → token/asset → recipient → amount →
validBefore → validAfter → signature (Permit2: spender → recipient → deadline → validAfter →
amount → token → signature). The chain is not consulted here (balances, nonces already
used on chain and cancellations are caught by the batch simulation before sending).
An invalid payment is a :class:`Rejected` value carrying the x402 reason code.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from ..chain import codec, crypto, permit2
from ..config import ChainConfig, EngineConfig, IngestConfig, TokenConfig
from ..model import (
    EIP3009,
    PERMIT2_EXACT,
    PERMIT2_UPTO,
    PaymentPayload,
    PaymentPayloadV1,
    PaymentPayloadV2,
    PaymentRequirements,
    Rejected,
    RequirementsV1,
    RequirementsV2,
)
from ..model import Payment as Payment
from ..rules import reasons

_payload_decoder = msgspec.json.Decoder(PaymentPayload)
_req_v1_decoder = msgspec.json.Decoder(RequirementsV1)
_req_v2_decoder = msgspec.json.Decoder(RequirementsV2)
_UINT48_MAX = 2**48 - 1
SIGNATURE_BYTES_MAX = 8192  # a smart wallet's signature (passkeys, multisig, ERC-6492), at most


class TokenSpec(msgspec.Struct, frozen=True):
    chain_id: int
    address: bytes
    name: str
    version: str
    domain_separator: bytes


class ChainSpec(msgspec.Struct, frozen=True):
    chain_id: int
    tokens: dict[bytes, TokenSpec]
    # signatures of any length (the batcher's settleSigned; compact mode), and the ERC-6492
    # factories allowed
    signed_items: bool = False
    factories: frozenset[bytes] = frozenset()
    permit2: bool = False  # Permit2 `exact` payments are settled here
    upto_facilitator: bytes | None = None  # the `upto` facilitator (our operator batcher)
    permit2_domain: bytes = b""


def _method_of(scheme: str, extra: dict[str, Any], chain: ChainSpec) -> int | tuple[str, str]:
    """The transfer method the requirements ask for, if this chain settles it."""
    method = extra.get("assetTransferMethod", "eip3009")
    if scheme == "upto":
        if chain.upto_facilitator is None:
            return reasons.UNSUPPORTED_SCHEME, "scheme 'upto' is not enabled on this network"
        return PERMIT2_UPTO
    if method == "permit2":
        if not chain.permit2:
            return reasons.INVALID_REQUIREMENTS, "Permit2 payments are not enabled on this network"
        return PERMIT2_EXACT
    if method != "eip3009":
        return (
            reasons.INVALID_REQUIREMENTS,
            f"assetTransferMethod {method!r} is not supported (eip3009 or permit2)",
        )
    return EIP3009


class _Terms(msgspec.Struct, frozen=True):
    """What the payment requirements ask for, resolved against the configuration."""

    chain: ChainSpec
    token: TokenSpec
    pay_to: bytes
    amount: int
    method: int


_Refusal = tuple[str, str]  # (x402 reason, message)


class Verifier:
    """Everything needed to check a payment, precomputed once from the configuration."""

    def __init__(self, config: EngineConfig) -> None:
        self._ingest: IngestConfig = config.ingest
        self._networks: dict[str, ChainSpec] = {}
        for chain in config.chains:
            spec = _chain_spec(chain)
            self._networks[chain.caip2] = spec
            for name in chain.network_names:
                self._networks[name] = spec
        upto = any(chain.upto_batcher for chain in config.chains)
        self._schemes = ("exact", "upto") if upto else ("exact",)

    def digest(self, payment: Payment) -> bytes:
        """The EIP-712 digest the payer signed (the token's domain, or Permit2's)."""
        if payment.method != EIP3009:
            chain = self._networks[f"eip155:{payment.chain_id}"]
            return permit2.digest(chain.permit2_domain, payment, chain.upto_facilitator)
        token = self.token(payment.chain_id, payment.token)
        assert token is not None, "a verified payment's token is configured"
        return crypto.transfer_digest(
            token.domain_separator,
            payment.payer,
            payment.payee,
            payment.value,
            payment.valid_after,
            payment.valid_before,
            payment.nonce,
        )

    def _contract_signature(self, signature: bytes, chain: ChainSpec) -> _Refusal | None:
        """Whether a signature that is not the payer's ECDSA signature may be a smart wallet's,
        for the chain to judge (None), or why not: any length with the batcher's signed items
        (compact mode), 65 bytes otherwise; ERC-6492 only from an allowlisted factory."""
        if not self._ingest.contract_signatures:
            return reasons.SIGNATURE, "signature does not recover to authorization.from"
        if len(signature) != 65:
            if not chain.signed_items or len(signature) > SIGNATURE_BYTES_MAX:
                return reasons.SIGNATURE, "signature does not recover to authorization.from"
            wrapped = codec.unwrap_6492(signature)
            if wrapped is not None and wrapped[0] not in chain.factories:
                return (
                    reasons.FACTORY_NOT_ALLOWED,
                    f"ERC-6492 factory 0x{wrapped[0].hex()} is not allowlisted",
                )
        return None

    def token(self, chain_id: int, address: bytes) -> TokenSpec | None:
        spec = self._networks.get(f"eip155:{chain_id}")
        return None if spec is None else spec.tokens.get(address)

    def check(
        self, payload: Any, requirements: Any, now: float
    ) -> tuple[Payment | None, Rejected | None]:
        """Decode and verify. Returns ``(payment, None)`` or ``(None, rejection)``."""
        decoded = decode(payload, requirements)
        if isinstance(decoded, Rejected):
            return None, decoded
        return self.verify(decoded[0], decoded[1], now)

    def verify(
        self, payload: PaymentPayload, req: PaymentRequirements, now: float
    ) -> tuple[Payment | None, Rejected | None]:
        """The reference facilitator's checks, in its order: the requirements' terms, then
        the authorization against them, then the signature."""
        payer_text = _payer_text(payload.payload.payer_text)
        terms = self._terms(payload, req)
        if isinstance(terms, tuple):
            return None, Rejected(*terms, payer_text)
        payment = (
            self._authorization(payload, req, terms, now)
            if terms.method == EIP3009
            else self._permit2_authorization(payload, req, terms, now)
        )
        if isinstance(payment, tuple):
            return None, Rejected(*payment, payer_text)
        if isinstance(payment, _ToCheck):  # both set: the chain decides (see Ingest)
            return payment.payment, Rejected(
                reasons.CONTRACT_SIGNATURE,
                "the signature does not recover to authorization.from; a contract payer may"
                " accept it (EIP-1271)",
                payer_text,
            )
        return payment, None

    def _terms(self, payload: PaymentPayload, req: PaymentRequirements) -> _Terms | _Refusal:
        """Scheme, version, network, token and its EIP-712 domain, payTo and the amount."""
        if req.scheme not in self._schemes:
            return reasons.UNSUPPORTED_SCHEME, f"scheme {req.scheme!r} is not supported"
        if isinstance(payload, PaymentPayloadV1):
            if not isinstance(req, RequirementsV1):
                return reasons.INVALID_VERSION, "payload is x402 v1, requirements are v2"
            scheme, network, amount_text = payload.scheme, payload.network, req.max_amount_required
        else:
            if not isinstance(req, RequirementsV2):
                return reasons.INVALID_VERSION, "payload is x402 v2, requirements are v1"
            if payload.accepted.scheme != req.scheme or payload.accepted.network != req.network:
                return reasons.INVALID_REQUIREMENTS, "payload.accepted does not match requirements"
            scheme, network, amount_text = (
                payload.accepted.scheme,
                payload.accepted.network,
                req.amount,
            )
        if scheme != req.scheme:
            return reasons.INVALID_SCHEME, "payload scheme does not match requirements"
        if network != req.network:
            return reasons.INVALID_NETWORK, "payload network does not match requirements"
        chain = self._networks.get(req.network)
        if chain is None:
            return reasons.INVALID_NETWORK, f"network {req.network!r} is not configured"
        asset = _address(req.asset)
        token = None if asset is None else chain.tokens.get(asset)
        if token is None:
            return reasons.INVALID_REQUIREMENTS, f"asset {req.asset!r} is not configured"
        extra = req.extra or {}
        method = _method_of(req.scheme, extra, chain)
        if isinstance(method, tuple):
            return method
        if ("name" in extra and extra["name"] != token.name) or (
            "version" in extra and extra["version"] != token.version
        ):
            return (
                reasons.INVALID_REQUIREMENTS,
                "extra.name/version differ from the token's EIP-712 domain",
            )
        pay_to = _address(req.pay_to)
        if pay_to is None:
            return reasons.INVALID_REQUIREMENTS, "payTo is not an address"
        amount = _uint(amount_text)
        if amount is None:
            return (
                reasons.INVALID_REQUIREMENTS,
                "amount is not a canonical unsigned integer (digits, no leading zeros)",
            )
        if amount < self._ingest.value_min:
            # Each payment costs the operator a transfer's gas: refuse dust (and zero).
            return (
                reasons.INVALID_REQUIREMENTS,
                f"amount {amount} is below the facilitator's minimum of {self._ingest.value_min}",
            )
        return _Terms(chain, token, pay_to, amount, method)

    def _authorization(
        self, payload: PaymentPayload, req: PaymentRequirements, terms: _Terms, now: float
    ) -> Payment | _ToCheck | _Refusal:
        """The signed authorization against the terms: fields, recipient, value, time window,
        and the signature under the token's domain separator."""
        auth = payload.payload.authorization
        if auth is None:
            return reasons.INVALID_PAYLOAD, "payload.authorization is missing (EIP-3009 payment)"
        payer = _address(auth.from_)
        payee = _address(auth.to)
        value = _uint(auth.value)
        valid_after = _uint(auth.valid_after)
        valid_before = _uint(auth.valid_before)
        nonce = _bytes32(auth.nonce)
        sig_raw = _hex(payload.payload.signature)
        if (
            payer is None
            or payee is None
            or value is None
            or valid_after is None
            or valid_before is None
            or nonce is None
            or sig_raw is None
        ):
            return reasons.INVALID_PAYLOAD, "authorization fields are malformed"
        if payee != terms.pay_to:
            return reasons.RECIPIENT_MISMATCH, "authorization.to differs from payTo"
        if value != terms.amount:
            return reasons.VALUE_MISMATCH, "authorization.value differs from the amount"
        if value > self._ingest.value_max:
            return reasons.INVALID_PAYLOAD, "value exceeds the engine's limit"
        if valid_before < now + self._ingest.valid_before_margin_s:
            return reasons.VALID_BEFORE, "authorization expires too soon"
        if valid_after > now + self._ingest.valid_after_tolerance_s:
            return reasons.VALID_AFTER, "authorization is not yet valid"
        if valid_before > _UINT48_MAX or valid_after > _UINT48_MAX:
            return reasons.INVALID_PAYLOAD, "validAfter/validBefore beyond 2**48"
        digest = crypto.transfer_digest(
            terms.token.domain_separator, payer, payee, value, valid_after, valid_before, nonce
        )
        signature = crypto.normalize_signature(sig_raw)
        to_check = False
        if signature is None or crypto.recover_address(digest, signature) != payer:
            refusal = self._contract_signature(sig_raw, terms.chain)
            if refusal is not None:
                if signature is None and refusal[0] == reasons.SIGNATURE:
                    return reasons.SIGNATURE, "signature is not a 65-byte low-s ECDSA signature"
                return refusal
            signature, to_check = sig_raw, True  # as signed: the wallet gets these bytes
        payment = Payment(
            chain_id=terms.chain.chain_id,
            token=terms.token.address,
            payer=payer,
            payee=payee,
            value=value,
            valid_after=valid_after,
            valid_before=valid_before,
            nonce=nonce,
            signature=signature,
            network=req.network,
            x402_version=2 if isinstance(payload, PaymentPayloadV2) else 1,
        )
        return _ToCheck(payment) if to_check else payment

    def _permit2_authorization(
        self, payload: PaymentPayload, req: PaymentRequirements, terms: _Terms, now: float
    ) -> Payment | _ToCheck | _Refusal:
        """A Permit2 ``PermitWitnessTransferFrom`` against the terms, in the reference
        facilitator's order: spender, recipient, deadline, validAfter, amount, token, then the
        signature under Permit2's domain (``upto``: the witness names our facilitator)."""
        auth = payload.payload.permit2_authorization
        if auth is None:
            return reasons.INVALID_PAYLOAD, "payload.permit2Authorization is missing"
        payer = _address(auth.from_)
        token = _address(auth.permitted.token)
        permitted = _uint(auth.permitted.amount)
        spender = _address(auth.spender)
        nonce_int = _uint_or_hex(auth.nonce)
        deadline = _uint(auth.deadline)
        payee = _address(auth.witness.to)
        valid_after = _uint(auth.witness.valid_after)
        sig_raw = _hex(payload.payload.signature)
        if (
            payer is None
            or token is None
            or permitted is None
            or spender is None
            or nonce_int is None
            or deadline is None
            or payee is None
            or valid_after is None
            or sig_raw is None
        ):
            return reasons.INVALID_PAYLOAD, "permit2Authorization fields are malformed"
        if spender != permit2.SPENDER[terms.method]:
            return reasons.PERMIT2_SPENDER, "the spender is not the x402 Permit2 proxy"
        if payee != terms.pay_to:
            return reasons.PERMIT2_RECIPIENT, "witness.to differs from payTo"
        if terms.method == PERMIT2_UPTO:
            facilitator = _address(auth.witness.facilitator or "")
            if facilitator != terms.chain.upto_facilitator:
                return reasons.UPTO_FACILITATOR, "witness.facilitator is not this facilitator"
        if deadline < now + self._ingest.valid_before_margin_s:
            return reasons.PERMIT2_DEADLINE, "the permit's deadline is too soon"
        if valid_after > now + self._ingest.valid_after_tolerance_s:
            return reasons.PERMIT2_NOT_YET_VALID, "witness.validAfter is in the future"
        if terms.method == PERMIT2_EXACT and permitted != terms.amount:
            return reasons.PERMIT2_AMOUNT, "permitted.amount differs from the amount"
        if terms.method == PERMIT2_UPTO and terms.amount > permitted:
            return reasons.UPTO_EXCEEDS, "the amount exceeds the permitted maximum"
        if permitted > self._ingest.value_max:
            return reasons.INVALID_PAYLOAD, "permitted.amount exceeds the engine's limit"
        if token != terms.token.address:
            return reasons.PERMIT2_TOKEN, "permitted.token differs from the asset"
        if deadline > _UINT48_MAX or valid_after > _UINT48_MAX:
            return reasons.INVALID_PAYLOAD, "deadline/validAfter beyond 2**48"
        payment = Payment(
            chain_id=terms.chain.chain_id,
            token=token,
            payer=payer,
            payee=payee,
            value=terms.amount,
            valid_after=valid_after,
            valid_before=deadline,
            nonce=nonce_int.to_bytes(32, "big"),
            signature=sig_raw,
            network=req.network,
            x402_version=2 if isinstance(payload, PaymentPayloadV2) else 1,
            method=terms.method,
            permitted=permitted,
        )
        if codec.unwrap_6492(sig_raw) is not None:
            # Permit2 asks a wallet through EIP-1271 only; it cannot deploy one first.
            return reasons.PERMIT2_SIGNATURE, "ERC-6492 signatures are not accepted with Permit2"
        digest = permit2.digest(terms.chain.permit2_domain, payment, terms.chain.upto_facilitator)
        signature = crypto.normalize_signature(sig_raw)
        if signature is not None and crypto.recover_address(digest, signature) == payer:
            return msgspec.structs.replace(payment, signature=signature)
        refusal = self._contract_signature(sig_raw, terms.chain)
        if refusal is not None:
            if refusal[0] == reasons.SIGNATURE:
                return reasons.PERMIT2_SIGNATURE, "the signature is not the payer's"
            return refusal
        return _ToCheck(payment)


class _ToCheck(msgspec.Struct, frozen=True):
    """A payment whose signature only the chain can judge (EIP-1271)."""

    payment: Payment


def decode(
    payload: Any, requirements: Any
) -> tuple[PaymentPayload, PaymentRequirements] | Rejected:
    """Decode a payload and requirements given as JSON bytes/str, dicts or Structs."""
    try:
        p = _decode_payload(payload)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        text = str(exc)
        payer = probe_payer(payload)
        if "$.x402Version" in text:
            return Rejected(reasons.INVALID_VERSION, f"paymentPayload: {text}", payer)
        return Rejected(reasons.INVALID_PAYLOAD, f"paymentPayload: {text}", payer)
    try:
        r = _decode_requirements(requirements, 1 if isinstance(p, PaymentPayloadV1) else 2)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        payer = _payer_text(p.payload.payer_text)
        return Rejected(reasons.INVALID_REQUIREMENTS, f"paymentRequirements: {exc}", payer)
    return p, r


class _FromProbe(msgspec.Struct):
    from_: str = msgspec.field(name="from", default="")


class _AuthorizationProbe(msgspec.Struct):
    authorization: _FromProbe = msgspec.field(default_factory=_FromProbe)


class _PayloadProbe(msgspec.Struct):
    payload: _AuthorizationProbe = msgspec.field(default_factory=_AuthorizationProbe)


class _AuthorizationProbe2(msgspec.Struct):
    permit2Authorization: _FromProbe = msgspec.field(default_factory=_FromProbe)


class _PayloadProbe2(msgspec.Struct):
    payload: _AuthorizationProbe2 = msgspec.field(default_factory=_AuthorizationProbe2)


_probe_decoder = msgspec.json.Decoder(_PayloadProbe)
_probe2_decoder = msgspec.json.Decoder(_PayloadProbe2)


def probe_payer(payload: Any) -> str | None:
    """``payload.authorization.from`` (or ``payload.permit2Authorization.from``) of a payload
    that does not decode as a whole (so that a refusal still names the payer), or None when
    even that is unreadable or not an address."""
    try:
        if isinstance(payload, bytes | bytearray | memoryview | str | msgspec.Raw):
            probe = _probe_decoder.decode(payload)
            probe2 = _probe2_decoder.decode(payload)
        else:
            probe = msgspec.convert(payload, _PayloadProbe, from_attributes=True)
            probe2 = msgspec.convert(payload, _PayloadProbe2, from_attributes=True)
    except (msgspec.ValidationError, msgspec.DecodeError, TypeError):
        return None
    return _payer_text(
        probe.payload.authorization.from_ or probe2.payload.permit2Authorization.from_
    )


def _payer_text(text: str) -> str | None:
    """A payer address as reported in answers (lower-case), if ``text`` is one."""
    return text.lower() if _address(text) is not None else None


def _decode_payload(value: Any) -> PaymentPayload:
    decoded: PaymentPayload
    if isinstance(value, PaymentPayloadV1 | PaymentPayloadV2):
        return value
    if isinstance(value, bytes | bytearray | memoryview | str | msgspec.Raw):
        decoded = _payload_decoder.decode(value)
    else:
        decoded = msgspec.convert(value, PaymentPayload)
    return decoded


def _decode_requirements(value: Any, version: int) -> PaymentRequirements:
    decoded: PaymentRequirements
    if isinstance(value, RequirementsV1 | RequirementsV2):
        return value
    if isinstance(value, bytes | bytearray | memoryview | str | msgspec.Raw):
        decoded = (_req_v1_decoder if version == 1 else _req_v2_decoder).decode(value)
    elif version == 1:
        decoded = msgspec.convert(value, RequirementsV1)
    else:
        decoded = msgspec.convert(value, RequirementsV2)
    return decoded


def _chain_spec(chain: ChainConfig) -> ChainSpec:
    tokens: dict[bytes, TokenSpec] = {}
    for token in chain.tokens:
        tokens[_token_address(token)] = _token_spec(chain.chain_id, token)
    factories = frozenset(bytes.fromhex(f[2:].lower()) for f in chain.eip6492_factories)
    return ChainSpec(
        chain.chain_id,
        tokens,
        chain.mode == "compact",
        factories,
        permit2=chain.permit2,
        upto_facilitator=chain.upto_batcher_address,
        permit2_domain=permit2.domain_separator(chain.chain_id),
    )


def _token_address(token: TokenConfig) -> bytes:
    raw = _address(token.address)
    assert raw is not None, token.address
    return raw


def _token_spec(chain_id: int, token: TokenConfig) -> TokenSpec:
    address = _token_address(token)
    return TokenSpec(
        chain_id,
        address,
        token.name,
        token.version,
        crypto.domain_separator(token.name, token.version, chain_id, address),
    )


def _hex(text: str) -> bytes | None:
    if not text.startswith(("0x", "0X")):
        return None
    try:
        return bytes.fromhex(text[2:])
    except ValueError:
        return None


def _address(text: str) -> bytes | None:
    raw = _hex(text) if len(text) == 42 else None
    return raw if raw is not None and len(raw) == 20 else None


def _bytes32(text: str) -> bytes | None:
    raw = _hex(text) if len(text) == 66 else None
    return raw if raw is not None and len(raw) == 32 else None


def _uint(text: str) -> int | None:
    # Canonical atomic units only: ASCII decimal digits, no sign, whitespace, underscores or
    # leading zeros ("010000" is not 10000 on the wire), bounded length (uint256).
    if not text or len(text) > 78 or not text.isascii() or not text.isdigit():
        return None
    if text[0] == "0" and len(text) > 1:
        return None
    value = int(text)
    return value if value < 2**256 else None


def _uint_or_hex(text: str) -> int | None:
    """A Permit2 nonce: decimal as the clients send it, or 0x-hex (some send that)."""
    if text.startswith(("0x", "0X")) and 2 < len(text) <= 66:
        try:
            return int(text[2:], 16)
        except ValueError:
            return None
    return _uint(text)


PAYMENT_IDENTIFIER = "payment-identifier"  # the x402 extension's key
_PAYMENT_ID = re.compile(r"[A-Za-z0-9_-]{16,128}")


class _ExtensionsProbe(msgspec.Struct):
    extensions: Any = None


_extensions_decoder = msgspec.json.Decoder(_ExtensionsProbe)


def payment_identifier(payload: Any) -> str | Rejected | None:
    """The buyer's ``extensions["payment-identifier"].info.id`` (x402 payment-identifier
    extension: 16-128 characters of ``A-Z a-z 0-9 _ -``), None when absent, or a refusal when
    it is malformed."""
    extensions: Any
    if isinstance(payload, PaymentPayloadV2):
        extensions = payload.extensions
    elif isinstance(payload, PaymentPayloadV1):
        return None
    elif isinstance(payload, bytes | bytearray | memoryview | str | msgspec.Raw):
        try:
            extensions = _extensions_decoder.decode(payload).extensions
        except (msgspec.ValidationError, msgspec.DecodeError):
            return None  # the payload's own decoding reports it
    elif isinstance(payload, dict):
        extensions = payload.get("extensions")
    else:
        return None
    if not isinstance(extensions, dict) or PAYMENT_IDENTIFIER not in extensions:
        return None
    entry = extensions[PAYMENT_IDENTIFIER]
    info = entry.get("info") if isinstance(entry, dict) else None
    identifier = info.get("id") if isinstance(info, dict) else None
    if identifier is None:
        return None  # declared (echoed from the requirements) without an id
    if not isinstance(identifier, str) or not _PAYMENT_ID.fullmatch(identifier):
        return Rejected(
            reasons.INVALID_PAYLOAD,
            "payment-identifier id must be 16-128 characters of A-Z, a-z, 0-9, _ and -",
            probe_payer(payload),
        )
    return identifier
