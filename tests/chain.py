"""Helpers for tests that run against a real anvil."""

from __future__ import annotations

from collections.abc import Sequence

from eth_abi.abi import encode as abi_encode

from engine.chain import codec, crypto
from engine.chain.rpc import Rpc, RpcError
from engine.dev.devchain import DevChain
from engine.model import hex_addr


async def balances(rpc: Rpc, token: str, owners: Sequence[str]) -> list[int]:
    to = token
    out: list[int] = []
    for start in range(0, len(owners), 200):
        chunk = owners[start : start + 200]
        results = await rpc.batch(
            [
                (
                    "eth_call",
                    [
                        {
                            "to": to,
                            "data": "0x" + codec.balance_of_calldata(bytes.fromhex(o[2:])).hex(),
                        },
                        "latest",
                    ],
                )
                for o in chunk
            ]
        )
        for r in results:
            assert not isinstance(r, RpcError), r
            out.append(int(r, 16))
    return out


async def count_authorization_used(rpc: Rpc, token: str, payer: bytes, nonce: bytes) -> int:
    logs = await rpc.call(
        "eth_getLogs",
        [
            {
                "address": token,
                "fromBlock": "0x0",
                "toBlock": "latest",
                "topics": [
                    "0x" + codec.AUTHORIZATION_USED.hex(),
                    "0x" + bytes(12).hex() + payer.hex(),
                    "0x" + nonce.hex(),
                ],
            }
        ],
    )
    return len(logs)


def payer_addresses(dev: DevChain) -> list[str]:
    return [hex_addr(crypto.private_key_address(k)) for k in dev.payer_key_bytes()]


def cancel_calldata(dev: DevChain, payer_key: bytes, nonce: bytes) -> bytes:
    """cancelAuthorization(authorizer, nonce, v, r, s) signed by the payer."""
    payer = crypto.private_key_address(payer_key)
    digest = crypto.cancel_digest(dev.domain.separator, payer, nonce)
    sig = crypto.sign_digest(payer_key, digest)
    return codec.selector(
        "cancelAuthorization(address,bytes32,uint8,bytes32,bytes32)"
    ) + abi_encode(
        ["address", "bytes32", "uint8", "bytes32", "bytes32"],
        [hex_addr(payer), nonce, sig[64], sig[0:32], sig[32:64]],
    )
