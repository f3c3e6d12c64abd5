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

import logging
from collections import deque
from functools import cache
from importlib import resources

import msgspec
import trio
from eth_abi.abi import decode as abi_decode
from eth_abi.abi import encode as abi_encode

from ..chain.rpc import ChainClient
from ..clock import Wakeup

log = logging.getLogger("x402_engine.signatures")


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


class _Question:
    __slots__ = ("done", "error", "item", "valid")

    def __init__(self, item: tuple[bytes, bytes, bytes]) -> None:
        self.item = item
        self.done = trio.Event()
        self.valid: bool | None = None
        self.error: Exception | None = None


class SignatureStatistics(msgspec.Struct, frozen=True):
    calls: int  # eth_calls made
    checked: int  # signatures judged by them


class SignatureReader:
    """Coalesced on-chain signature checks for one chain. Run :meth:`run` in a nursery."""

    def __init__(
        self, rpc: ChainClient, *, window_s: float, batch_max: int, queue_max: int = 10_000
    ) -> None:
        assert window_s >= 0 and 1 <= batch_max <= queue_max
        self._rpc = rpc
        self._window_s = window_s
        self._batch_max = batch_max
        self._queue_max = queue_max
        self._queue: deque[_Question] = deque()
        self._arrived = Wakeup()
        self._room = Wakeup()
        self._calls = 0
        self._checked = 0

    def statistics(self) -> SignatureStatistics:
        return SignatureStatistics(self._calls, self._checked)

    async def valid(self, signer: bytes, digest: bytes, signature: bytes) -> bool:
        """Whether ``signer`` signed ``digest`` with ``signature`` as the token will judge it
        (EIP-1271 for a payer with code, ECDSA otherwise); raises what the call raised."""
        while len(self._queue) >= self._queue_max:  # bounded: wait for room
            await self._room.wait()
        question = _Question((signer, digest, signature))
        self._queue.append(question)
        self._arrived.set()
        await question.done.wait()
        if question.error is not None:
            raise question.error
        assert question.valid is not None
        return question.valid

    async def run(self) -> None:
        while True:
            if not self._queue:
                await self._arrived.wait()
                continue
            if self._window_s:
                await trio.sleep(self._window_s)  # let concurrent questions join
            batch = [self._queue.popleft() for _ in range(min(self._batch_max, len(self._queue)))]
            self._room.set()
            await self._ask(batch)

    async def _ask(self, batch: list[_Question]) -> None:
        try:
            returned = await self._rpc.eth_call_code(checks_call([q.item for q in batch]))
            verdicts = decode_checks(returned, len(batch))
            self._calls += 1
            self._checked += len(batch)
            for question, verdict in zip(batch, verdicts, strict=True):
                question.valid = verdict
        except Exception as exc:  # node trouble or a malformed answer: every asker is told
            log.warning("signature check of %d payments failed: %s", len(batch), exc)
            for question in batch:
                question.error = exc
        finally:
            for question in batch:
                question.done.set()
