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

from collections.abc import Iterable

import msgspec

Key = tuple[bytes, bytes]  # (token, payer)


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

    def limit(self, key: Key) -> int | None:
        """The most this payer may owe unsettled: its balance, capped (None: not read)."""
        found = self._balances.get(key)
        if found is None:
            return None
        return min(found[0], self.payer_cap) if self.payer_cap else found[0]

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
