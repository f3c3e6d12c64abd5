"""EIP-712 / EIP-3009 digests and secp256k1 signatures, with no I/O.

Domain separators and type hashes are computed once per token. Recovery uses coincurve
(libsecp256k1) on a hand-built digest rather than eth_account's generic typed-data path, which
is about seven times slower (see ../shared/x402-facts.md).
"""

from __future__ import annotations

import threading

import coincurve
import sha3  # safe-pysha3: the fastest keccak-256 available to CPython here

# libsecp256k1 through coincurve's own cffi binding (coincurve is pinned to 21.x): calling it
# directly with buffers reused per thread skips the wrapper objects of the public API
# (3 us of 48 per recovery, measured here).
from coincurve._libsecp256k1 import ffi, lib
from coincurve.context import GLOBAL_CONTEXT

SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
SECP256K1_HALF_N = SECP256K1_N // 2

_ZERO12 = bytes(12)


def keccak256(data: bytes) -> bytes:
    digest: bytes = sha3.keccak_256(data).digest()
    return digest


EIP712_DOMAIN_TYPEHASH = keccak256(
    b"EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
)
TRANSFER_WITH_AUTHORIZATION_TYPEHASH = keccak256(
    b"TransferWithAuthorization(address from,address to,uint256 value,uint256 validAfter,"
    b"uint256 validBefore,bytes32 nonce)"
)
CANCEL_AUTHORIZATION_TYPEHASH = keccak256(b"CancelAuthorization(address authorizer,bytes32 nonce)")


def domain_separator(name: str, version: str, chain_id: int, verifying_contract: bytes) -> bytes:
    """EIP-712 domain separator of an EIP-3009 token."""
    assert len(verifying_contract) == 20
    return keccak256(
        EIP712_DOMAIN_TYPEHASH
        + keccak256(name.encode())
        + keccak256(version.encode())
        + chain_id.to_bytes(32, "big")
        + _ZERO12
        + verifying_contract
    )


def transfer_digest(
    domain_sep: bytes,
    payer: bytes,
    payee: bytes,
    value: int,
    valid_after: int,
    valid_before: int,
    nonce: bytes,
) -> bytes:
    """The EIP-712 digest a payer signs for ``transferWithAuthorization``."""
    struct_hash = keccak256(
        TRANSFER_WITH_AUTHORIZATION_TYPEHASH
        + _ZERO12
        + payer
        + _ZERO12
        + payee
        + value.to_bytes(32, "big")
        + valid_after.to_bytes(32, "big")
        + valid_before.to_bytes(32, "big")
        + nonce
    )
    return keccak256(b"\x19\x01" + domain_sep + struct_hash)


def cancel_digest(domain_sep: bytes, authorizer: bytes, nonce: bytes) -> bytes:
    struct_hash = keccak256(CANCEL_AUTHORIZATION_TYPEHASH + _ZERO12 + authorizer + nonce)
    return keccak256(b"\x19\x01" + domain_sep + struct_hash)


def address_of_public_key(uncompressed: bytes) -> bytes:
    assert len(uncompressed) == 65 and uncompressed[0] == 4
    return keccak256(uncompressed[1:])[12:]


def normalize_signature(sig: bytes) -> bytes | None:
    """Return ``r || s || v`` with v in {27, 28}, or None if it cannot be a valid ECDSA
    signature as the token checks it (65 bytes, v in {0, 1, 27, 28}, low s, r and s non-zero)."""
    if len(sig) != 65:
        return None
    v = sig[64]
    if v in (0, 1):
        v += 27
    if v not in (27, 28):
        return None
    r = int.from_bytes(sig[0:32], "big")
    s = int.from_bytes(sig[32:64], "big")
    if not (0 < r < SECP256K1_N) or not (0 < s <= SECP256K1_HALF_N):
        return None
    return sig[:64] + bytes([v])


class _Buffers(threading.local):
    def __init__(self) -> None:
        self.sig = ffi.new("secp256k1_ecdsa_recoverable_signature *")
        self.pub = ffi.new("secp256k1_pubkey *")
        self.out = ffi.new("unsigned char[65]")
        self.out_len = ffi.new("size_t *")


_buffers = _Buffers()
_CTX = GLOBAL_CONTEXT.ctx
_EC_UNCOMPRESSED = 2  # SECP256K1_EC_UNCOMPRESSED


def recover_address(digest: bytes, sig: bytes) -> bytes | None:
    """Recover the signer's address from a normalized 65-byte signature (v = 27/28)."""
    assert len(digest) == 32 and len(sig) == 65
    rec_id = sig[64] - 27
    if not 0 <= rec_id <= 1:
        return None
    b = _buffers
    if not lib.secp256k1_ecdsa_recoverable_signature_parse_compact(_CTX, b.sig, sig, rec_id):
        return None
    if not lib.secp256k1_ecdsa_recover(_CTX, b.pub, b.sig, digest):
        return None
    b.out_len[0] = 65
    lib.secp256k1_ec_pubkey_serialize(_CTX, b.out, b.out_len, b.pub, _EC_UNCOMPRESSED)
    return keccak256(ffi.buffer(b.out, 65)[1:])[12:]


def sign_digest(private_key: bytes, digest: bytes) -> bytes:
    """Sign a 32-byte digest; returns ``r || s || v`` with v in {27, 28} and low s."""
    raw = coincurve.PrivateKey(private_key).sign_recoverable(digest, hasher=None)
    return raw[:64] + bytes([raw[64] + 27])


def private_key_address(private_key: bytes) -> bytes:
    return address_of_public_key(coincurve.PrivateKey(private_key).public_key.format(False))
