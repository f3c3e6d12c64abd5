"""Smart-wallet signatures: the payers the stateless check cannot judge.

A 65-byte signature that does not recover to ``authorization.from`` may still be valid: the
payer may be a contract (a smart wallet) that accepts it through EIP-1271, as the token will
ask it (USDC v2.2 routes a payer with code to ``isValidSignature``). Only the chain can tell.
:class:`SignatureReader` asks it for many payments at once: one deployless ``eth_call`` of
``SignatureChecks`` (creation code that returns a verdict per signature, nothing deployed),
gathering concurrent questions for ``window_s``, at most ``batch_max`` per call, one call in
flight per chain. For a payer without code the same call checks ECDSA, so a bad signature of an
ordinary account is refused there, one call for many.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

import msgspec
from eth_abi.abi import decode as abi_decode
from eth_abi.abi import encode as abi_encode

from ..chain.rpc import ChainClient
from .coalesce import Coalescer


@cache
def _creation_code() -> bytes:
    """SignatureChecks' creation code, shipped with the package (contracts/README.md)."""
    raw = (resources.files("engine.dev") / "contracts" / "SignatureChecks.json").read_bytes()
    return bytes.fromhex(msgspec.json.decode(raw)["bytecode"].removeprefix("0x"))


def checks_call(items: list[tuple[bytes, bytes, bytes]]) -> bytes:
    """The deployless call for (signer, digest, signature) items."""
    args = abi_encode(
        ["address[]", "bytes32[]", "bytes[]"],
        [[i[0] for i in items], [i[1] for i in items], [i[2] for i in items]],
    )
    return _creation_code() + args


def decode_checks(returned: bytes, count: int) -> list[bool]:
    (valid,) = abi_decode(["bool[]"], returned)
    if len(valid) != count:
        raise ValueError("SignatureChecks answered a different number of verdicts")
    return [bool(v) for v in valid]


class SignatureStatistics(msgspec.Struct, frozen=True):
    calls: int  # eth_calls made
    checked: int  # signatures judged by them


class SignatureReader:
    """Coalesced on-chain signature checks for one chain. Run :meth:`run` in a nursery."""

    def __init__(
        self, rpc: ChainClient, *, window_s: float, batch_max: int, queue_max: int = 10_000
    ) -> None:
        self._rpc = rpc
        self._coalescer: Coalescer[tuple[bytes, bytes, bytes], bool] = Coalescer(
            self._check,
            window_s=window_s,
            batch_max=batch_max,
            queue_max=queue_max,
            what="signature checks",
        )

    def statistics(self) -> SignatureStatistics:
        return SignatureStatistics(self._coalescer.calls, self._coalescer.answered)

    async def valid(self, signer: bytes, digest: bytes, signature: bytes) -> bool:
        """Whether ``signer`` signed ``digest`` with ``signature`` as the token will judge it
        (EIP-1271 for a payer with code, ECDSA otherwise); raises what the call raised."""
        return await self._coalescer.ask((signer, digest, signature))

    async def run(self) -> None:
        await self._coalescer.run()

    async def _check(self, items: list[tuple[bytes, bytes, bytes]]) -> list[bool]:
        returned = await self._rpc.eth_call_code(checks_call(items))
        return decode_checks(returned, len(items))
