"""Permit2 payments (the x402 ``exact`` and ``upto`` schemes' ``permit2`` transfer method):
the EIP-712 digest the payer signs, the proxies' ``settle`` calls, and the reads that tell
whether a payment can still settle (its unordered nonce, the payer's allowance to Permit2).
No I/O.

The payer signs a Permit2 ``PermitWitnessTransferFrom`` whose spender is an x402 proxy and
whose witness binds the destination and the earliest time (``upto``: also the facilitator
allowed to choose the amount). Anyone may submit an ``exact`` permit; only the witness's
facilitator an ``upto`` one. Permit2's nonces are the payer's across all tokens: bit
``nonce & 0xff`` of word ``nonce >> 8`` of ``nonceBitmap(payer, word)``.
"""

from __future__ import annotations

from eth_abi.abi import encode as abi_encode

from ..model import (
    EXACT_PERMIT2_PROXY,
    PERMIT2,
    PERMIT2_EXACT,
    PERMIT2_UPTO,
    UPTO_PERMIT2_PROXY,
    Payment,
)
from .crypto import keccak256

_ZERO12 = bytes(12)
_DOMAIN_TYPEHASH = keccak256(b"EIP712Domain(string name,uint256 chainId,address verifyingContract)")
_TOKEN_PERMISSIONS = b"TokenPermissions(address token,uint256 amount)"
_TOKEN_PERMISSIONS_TYPEHASH = keccak256(_TOKEN_PERMISSIONS)
_EXACT_WITNESS = b"Witness(address to,uint256 validAfter)"
_UPTO_WITNESS = b"Witness(address to,address facilitator,uint256 validAfter)"
_STUB = (
    b"PermitWitnessTransferFrom(TokenPermissions permitted,address spender,uint256 nonce,"
    b"uint256 deadline,Witness witness)"
)
_PERMIT_TYPEHASH = {
    PERMIT2_EXACT: keccak256(_STUB + _TOKEN_PERMISSIONS + _EXACT_WITNESS),
    PERMIT2_UPTO: keccak256(_STUB + _TOKEN_PERMISSIONS + _UPTO_WITNESS),
}
_WITNESS_TYPEHASH = {
    PERMIT2_EXACT: keccak256(_EXACT_WITNESS),
    PERMIT2_UPTO: keccak256(_UPTO_WITNESS),
}
SPENDER = {PERMIT2_EXACT: EXACT_PERMIT2_PROXY, PERMIT2_UPTO: UPTO_PERMIT2_PROXY}

_PERMIT = "((address,uint256),uint256,uint256)"
EXACT_SETTLE = keccak256(f"settle({_PERMIT},address,(address,uint256),bytes)".encode())[:4]
UPTO_SETTLE = keccak256(
    f"settle({_PERMIT},uint256,address,(address,address,uint256),bytes)".encode()
)[:4]
NONCE_BITMAP = keccak256(b"nonceBitmap(address,uint256)")[:4]
ALLOWANCE = keccak256(b"allowance(address,address)")[:4]
APPROVE = keccak256(b"approve(address,uint256)")[:4]
MAX_UINT256 = 2**256 - 1

# Revert data of the proxies and Permit2 → the reference facilitator's reason codes.
_ERRORS = {
    "InvalidNonce()": "permit2_invalid_nonce",
    "PaymentTooEarly()": "permit2_payment_too_early",
    "SignatureExpired(uint256)": "permit2_deadline_expired",
    "InvalidSignature()": "invalid_permit2_signature",
    "InvalidSigner()": "invalid_permit2_signature",
    "InvalidSignatureLength()": "invalid_permit2_signature",
    "InvalidContractSignature()": "invalid_permit2_signature",
    "InvalidAmount()": "invalid_permit2_amount",
    "InvalidAmount(uint256)": "invalid_permit2_amount",
    "InvalidOwner()": "permit2_invalid_owner",
    "InvalidDestination()": "permit2_invalid_destination",
    "AmountExceedsPermitted()": "upto_amount_exceeds_permitted",
    "UnauthorizedFacilitator()": "upto_unauthorized_facilitator",
}
ERRORS: dict[bytes, tuple[str, str]] = {
    keccak256(sig.encode())[:4]: (reason, sig.split("(")[0]) for sig, reason in _ERRORS.items()
}


def domain_separator(chain_id: int) -> bytes:
    """Permit2's EIP-712 domain: name "Permit2", no version, at the canonical address."""
    return keccak256(
        _DOMAIN_TYPEHASH + keccak256(b"Permit2") + chain_id.to_bytes(32, "big") + _ZERO12 + PERMIT2
    )


def witness_hash(p: Payment, facilitator: bytes | None = None) -> bytes:
    parts = _WITNESS_TYPEHASH[p.method] + _ZERO12 + p.payee
    if p.method == PERMIT2_UPTO:
        assert facilitator is not None and len(facilitator) == 20
        parts += _ZERO12 + facilitator
    return keccak256(parts + p.valid_after.to_bytes(32, "big"))


def digest(domain_sep: bytes, p: Payment, facilitator: bytes | None = None) -> bytes:
    """The EIP-712 digest the payer signed: ``PermitWitnessTransferFrom`` of ``p.permitted``
    of ``p.token`` to the scheme's proxy, with the witness (``upto``: naming ``facilitator``)."""
    permissions = keccak256(
        _TOKEN_PERMISSIONS_TYPEHASH + _ZERO12 + p.token + p.permitted.to_bytes(32, "big")
    )
    struct_hash = keccak256(
        _PERMIT_TYPEHASH[p.method]
        + permissions
        + _ZERO12
        + SPENDER[p.method]
        + p.nonce
        + p.valid_before.to_bytes(32, "big")
        + witness_hash(p, facilitator)
    )
    return keccak256(b"\x19\x01" + domain_sep + struct_hash)


def settle_call(p: Payment, facilitator: bytes | None = None) -> tuple[bytes, bytes]:
    """(proxy, calldata) of the proxy's ``settle`` for one payment."""
    permit = ((p.token, p.permitted), int.from_bytes(p.nonce, "big"), p.valid_before)
    if p.method == PERMIT2_EXACT:
        data = EXACT_SETTLE + abi_encode(
            [_PERMIT, "address", "(address,uint256)", "bytes"],
            [permit, p.payer, (p.payee, p.valid_after), p.signature],
        )
        return EXACT_PERMIT2_PROXY, data
    assert facilitator is not None
    data = UPTO_SETTLE + abi_encode(
        [_PERMIT, "uint256", "address", "(address,address,uint256)", "bytes"],
        [permit, p.value, p.payer, (p.payee, facilitator, p.valid_after), p.signature],
    )
    return UPTO_PERMIT2_PROXY, data


def nonce_bitmap_calldata(payer: bytes, nonce: bytes) -> bytes:
    """``nonceBitmap(payer, word)`` of the word holding ``nonce``'s bit."""
    word = int.from_bytes(nonce, "big") >> 8
    return NONCE_BITMAP + _ZERO12 + payer + word.to_bytes(32, "big")


def nonce_used(nonce: bytes, bitmap_word: bytes) -> bool:
    """Whether ``nonce``'s bit is set in the ``nonceBitmap`` word read for it."""
    return (int.from_bytes(bitmap_word[:32], "big") >> nonce[-1]) & 1 == 1


def allowance_calldata(payer: bytes) -> bytes:
    """``token.allowance(payer, Permit2)``."""
    return ALLOWANCE + _ZERO12 + payer + _ZERO12 + PERMIT2


def approve_calldata(amount: int = MAX_UINT256) -> bytes:
    """``token.approve(Permit2, amount)``: the payer's one-time step before Permit2 payments."""
    return APPROVE + _ZERO12 + PERMIT2 + amount.to_bytes(32, "big")


def failure(revert: bytes) -> tuple[str, str] | None:
    """(x402 reason, error name) for a Permit2 or proxy custom error, else None."""
    return ERRORS.get(revert[:4])
