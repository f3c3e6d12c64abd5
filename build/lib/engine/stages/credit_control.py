"""Credit control's I/O: balances read in bulk through ``aggregate3`` and the refresh loop that
settles a payer at once when their balance no longer covers what they owe (the book itself is
pure: :mod:`engine.rules.credit`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

import trio

from ..chain import codec
from ..chain.rpc import ChainClient, RpcError, RpcUnavailable
from ..clock import Clock
from ..rules.credit import CreditBook, Key

log = logging.getLogger("x402_engine.credit")
READ_CHUNK = 500  # balanceOf calls per aggregate3 eth_call


class BalanceReader:
    """Reads balances through ``aggregate3`` at ``target`` (the batcher or Multicall3)."""

    def __init__(self, rpc: ChainClient, target: bytes) -> None:
        self._rpc = rpc
        self._target = target
        self._lock = trio.Lock()  # one read at a time: concurrent callers queue, bounded
        self.reads = 0

    async def read(self, token: bytes, payers: Sequence[bytes]) -> dict[bytes, int]:
        """Balances of ``payers`` (a failed balanceOf reads as 0: nothing to lend against)."""
        out: dict[bytes, int] = {}
        async with self._lock:
            for start in range(0, len(payers), READ_CHUNK):
                chunk = list(payers[start : start + READ_CHUNK])
                data = codec.balances_aggregate3_calldata(token, chunk)
                returned = await self._rpc.eth_call(self._target, data)
                self.reads += 1
                values = codec.decode_balances(returned)
                if len(values) != len(chunk):
                    raise ValueError("aggregate3 returned a balance count mismatch")
                for payer, value in zip(chunk, values, strict=True):
                    out[payer] = value or 0
        return out


class ChainCredit:
    """One chain's credit control: the book, the balance reads, and the refresh that settles
    a payer at once (``on_shortfall(token, payers)``) when their balance no longer covers what
    they owe (what then fails is recorded as the uncollected amount)."""

    def __init__(
        self,
        book: CreditBook,
        reader: BalanceReader,
        clock: Clock,
        refresh_s: float,
        on_shortfall: Callable[[bytes, set[bytes]], object],
    ) -> None:
        self.book = book
        self._reader = reader
        self._clock = clock
        self._refresh_s = refresh_s
        self._on_shortfall = on_shortfall
        self.shortfalls_seen = 0

    async def read_balances(self, keys: Iterable[Key]) -> None:
        """Read the balances of ``keys`` ((token, payer)) into the book."""
        by_token: dict[bytes, list[bytes]] = {}
        for token, payer in keys:
            by_token.setdefault(token, []).append(payer)
        for token, payers in by_token.items():
            read = await self._reader.read(token, payers)
            now = self._clock.now()
            for payer, balance in read.items():
                self.book.set_balance((token, payer), balance, now)

    async def run(self) -> None:
        """Re-read every debtor's balance every ``refresh_s``; report shortfalls."""
        while True:
            await trio.sleep(self._refresh_s)
            debtors = self.book.debtors()
            if not debtors:
                self.book.forget_unowed()
                continue
            try:
                await self.read_balances(debtors)
            except (RpcError, RpcUnavailable) as exc:
                log.warning("credit refresh failed, will retry: %s", exc)
                continue
            short: dict[bytes, set[bytes]] = {}
            for s in self.book.shortfalls():
                log.warning(
                    "payer 0x%s owes %d of token 0x%s but holds %d: settling their payments now",
                    s.payer.hex(),
                    s.owed,
                    s.token.hex(),
                    s.balance,
                )
                short.setdefault(s.token, set()).add(s.payer)
            for token, payers in short.items():
                self.shortfalls_seen += len(payers)
                self._on_shortfall(token, payers)
            self.book.forget_unowed()
