"""Credit control for deferred settlement.

A payment accepted for a windowed or scheduled payee is credit until it settles: the payer could
spend the tokens elsewhere (or cancel the authorization) in between. Per (token, payer) the sum
of accepted-but-unsettled values never exceeds the payer's last read on-chain balance (nor the
optional per-payer cap); beyond it a payment is refused with ``insufficient_funds``. Balances
are read in bulk (one ``aggregate3`` of ``balanceOf`` calls per token), cached, read again when
older than ``balance_max_age_s`` before more credit is given, and refreshed every ``refresh_s``
for every payer who owes something. A payer whose balance fell below what they owe is reported
as a shortfall so the engine settles their payments at once; what then fails is recorded as
failed (``insufficient_funds``): the uncollected amount.

:class:`CreditBook` is pure (no I/O, time passed in); :class:`BalanceReader` does the reads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

import msgspec
import trio

from . import codec
from .clock import Clock
from .rpc import ChainClient, RpcError, RpcUnavailable

log = logging.getLogger("x402_engine.credit")

Key = tuple[bytes, bytes]  # (token, payer)
READ_CHUNK = 500  # balanceOf calls per aggregate3 eth_call


class Shortfall(msgspec.Struct, frozen=True):
    token: bytes
    payer: bytes
    owed: int
    balance: int


class CreditBook:
    """Owed (accepted, not yet final) and last read balances per (token, payer)."""

    def __init__(self, balance_max_age_s: float, payer_cap: int = 0) -> None:
        assert balance_max_age_s > 0 and payer_cap >= 0
        self.balance_max_age_s = balance_max_age_s
        self.payer_cap = payer_cap
        self._owed: dict[Key, int] = {}
        self._balances: dict[Key, tuple[int, float]] = {}  # balance, read at
        self.refused = 0

    def owed(self, key: Key) -> int:
        return self._owed.get(key, 0)

    def balance(self, key: Key) -> int | None:
        found = self._balances.get(key)
        return None if found is None else found[0]

    def stale(self, keys: Iterable[Key], now: float) -> list[Key]:
        """The keys whose balance is unknown or too old to lend against."""
        out: list[Key] = []
        for key in keys:
            found = self._balances.get(key)
            if found is None or now - found[1] > self.balance_max_age_s:
                out.append(key)
        return out

    def set_balance(self, key: Key, balance: int, now: float) -> None:
        assert balance >= 0
        self._balances[key] = (balance, now)

    def check(self, key: Key, value: int) -> str | None:
        """Why ``value`` more would be too much credit for this payer (None: it fits)."""
        owed = self._owed.get(key, 0)
        found = self._balances.get(key)
        if found is None:
            return "the payer's balance could not be read"
        if owed + value > found[0]:
            return f"unsettled {owed} + {value} exceeds the payer's balance {found[0]}"
        if self.payer_cap and owed + value > self.payer_cap:
            return f"unsettled {owed} + {value} exceeds the per-payer cap {self.payer_cap}"
        return None

    def reserve(self, key: Key, value: int) -> None:
        self._owed[key] = self._owed.get(key, 0) + value

    def release(self, key: Key, value: int) -> None:
        left = self._owed.get(key, 0) - value
        assert left >= 0, (key, left)
        if left:
            self._owed[key] = left
        else:
            self._owed.pop(key, None)

    def debtors(self) -> list[Key]:
        return list(self._owed)

    def owed_by_token(self) -> dict[bytes, int]:
        out: dict[bytes, int] = {}
        for (token, _), owed in self._owed.items():
            out[token] = out.get(token, 0) + owed
        return out

    def shortfalls(self) -> list[Shortfall]:
        """Payers who owe more than their last read balance."""
        out: list[Shortfall] = []
        for key, owed in self._owed.items():
            found = self._balances.get(key)
            if found is not None and found[0] < owed:
                out.append(Shortfall(key[0], key[1], owed, found[0]))
        return out

    def forget_unowed(self) -> None:
        """Drop balances of payers who owe nothing (bounded memory)."""
        for key in [k for k in self._balances if k not in self._owed]:
            del self._balances[key]


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
