"""EIP-712 digests and signatures against eth_account's reference implementation."""

from __future__ import annotations

import os

from eth_account import Account
from eth_account.messages import encode_typed_data

from engine.chain import crypto


def _typed(token: bytes, chain_id: int, msg: dict[str, object]) -> dict[str, object]:
    return {
        "types": {
            "EIP712Domain": [
                {"name": "name", "type": "string"},
                {"name": "version", "type": "string"},
                {"name": "chainId", "type": "uint256"},
                {"name": "verifyingContract", "type": "address"},
            ],
            "TransferWithAuthorization": [
                {"name": "from", "type": "address"},
                {"name": "to", "type": "address"},
                {"name": "value", "type": "uint256"},
                {"name": "validAfter", "type": "uint256"},
                {"name": "validBefore", "type": "uint256"},
                {"name": "nonce", "type": "bytes32"},
            ],
        },
        "primaryType": "TransferWithAuthorization",
        "domain": {
            "name": "USD Coin",
            "version": "2",
            "chainId": chain_id,
            "verifyingContract": "0x" + token.hex(),
        },
        "message": msg,
    }


def test_transfer_digest_matches_eth_account_and_recovers_signer() -> None:
    key = os.urandom(32)
    payer = crypto.private_key_address(key)
    payee, token, nonce = os.urandom(20), os.urandom(20), os.urandom(32)
    msg = {
        "from": Account.from_key(key).address,
        "to": "0x" + payee.hex(),
        "value": 1234,
        "validAfter": 10,
        "validBefore": 2**40,
        "nonce": nonce,
    }
    signable = encode_typed_data(full_message=_typed(token, 8453, msg))
    reference = Account.sign_message(signable, key)
    sep = crypto.domain_separator("USD Coin", "2", 8453, token)
    digest = crypto.transfer_digest(sep, payer, payee, 1234, 10, 2**40, nonce)
    ours = crypto.sign_digest(key, digest)
    assert bytes(reference.signature) == ours  # RFC 6979: deterministic, identical bytes
    assert crypto.recover_address(digest, ours) == payer
    other = crypto.transfer_digest(sep, payer, payee, 1235, 10, 2**40, nonce)
    assert crypto.recover_address(other, ours) != payer


def test_normalize_signature_rejects_high_s_and_bad_v() -> None:
    key, digest = os.urandom(32), os.urandom(32)
    sig = crypto.sign_digest(key, digest)
    assert crypto.normalize_signature(sig) == sig
    assert crypto.normalize_signature(sig[:64] + bytes([sig[64] - 27])) == sig
    s = int.from_bytes(sig[32:64], "big")
    high = sig[:32] + (crypto.SECP256K1_N - s).to_bytes(32, "big") + sig[64:]
    assert crypto.normalize_signature(high) is None
    assert crypto.normalize_signature(sig[:64] + b"\x05") is None
    assert crypto.normalize_signature(sig[:64]) is None
