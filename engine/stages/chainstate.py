"""What the chain says about a payment before we call it valid: the payer's balance, whether the
authorization's nonce is already used or cancelled, and whether the token has code.

``/verify`` (and a deferred ``/settle``, which answers before anything is sent) asks this for
every payment, so it must not cost one RPC each. Concurrent questions are coalesced: those that
arrive within ``window_s`` of the first (or while earlier reads are in flight) share one
``aggregate3`` ``eth_call`` of ``balanceOf`` + ``authorizationState`` (Permit2 payments:
Permit2's ``nonceBitmap`` + the token's ``allowance`` to Permit2) for up to ``batch_max``
payments. Answers are cached for ``max_age_s``; a used nonce is cached until evicted (it can
never become unused again).

Staleness is bounded by ``max_age_s`` plus one read's round trip. It can only make ``/verify``
call valid a payment whose settlement then fails (the payer spent or cancelled in between):
the batch simulation before sending decides from the chain as it is then, so a stale answer
never pays twice and never loses a payment.

:func:`judge` and :class:`StateCache` are pure; :class:`ChainStateReader` does the reads.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import msgspec

from ..chain import codec, permit2
from ..chain.rpc import ChainClient
from ..clock import Clock
from ..model import EIP3009, PERMIT2, Payment, Rejected, hex_addr
from ..rules import reasons
from .coalesce import Coalescer


class PayerState(msgspec.Struct, frozen=True):
    """One payment's view of the chain."""

    token_has_code: bool
    balance: int | None  # None: balanceOf failed
    nonce_used: bool | None  # authorizationState (used or cancelled); None: the call failed
    allowance: int | None = None  # Permit2 payments: the token's allowance to Permit2


def judge(payment: Payment, state: PayerState) -> Rejected | None:
    """The refusal the chain state calls for (None: the chain has no objection)."""
    payer = hex_addr(payment.payer)
    if not state.token_has_code:
        return Rejected(
            reasons.ASSET_NOT_DEPLOYED,
            f"token {hex_addr(payment.token)} has no code on chain {payment.chain_id}",
            payer,
        )
    if state.nonce_used is None or state.balance is None:
        return Rejected(
            reasons.UNEXPECTED_VERIFY,
            "the token's balanceOf/authorizationState could not be read",
            payer,
        )
    if payment.method != EIP3009:
        if state.nonce_used:
            return Rejected(
                reasons.PERMIT2_NONCE_USED, "the Permit2 nonce is already used or cancelled", payer
            )
        if state.allowance is None or state.allowance < payment.value:
            return Rejected(
                reasons.PERMIT2_ALLOWANCE,
                f"the payer's allowance to Permit2 ({state.allowance}) is below the amount"
                f" {payment.value}: approve Permit2 once (token.approve)",
                payer,
            )
    elif state.nonce_used:
        return Rejected(
            reasons.NONCE_USED, "the authorization is already used or cancelled on chain", payer
        )
    if state.balance < payment.value:
        return Rejected(
            reasons.INSUFFICIENT_FUNDS,
            f"the payer holds {state.balance}, less than the amount {payment.value}",
            payer,
        )
    return None


BalanceKey = tuple[bytes, bytes]  # (token, payer)
NonceKey = tuple[bytes, bytes, bytes, int]  # (token, payer, nonce, method)


class StateCache:
    """Recent answers, each at most ``max_age_s`` old (used nonces: any age). Bounded: the
    oldest entries go first beyond ``entries_max`` per kind."""

    def __init__(self, max_age_s: float, entries_max: int = 100_000) -> None:
        assert max_age_s >= 0 and entries_max >= 1
        self.max_age_s = max_age_s
        self.entries_max = entries_max
        self._balances: OrderedDict[BalanceKey, tuple[int, float]] = OrderedDict()
        self._nonces: OrderedDict[NonceKey, tuple[bool, float]] = OrderedDict()
        self._allowances: OrderedDict[BalanceKey, tuple[int, float]] = OrderedDict()
        self._no_code: dict[bytes, float] = {}  # token -> when it was seen without code

    def get(
        self, token: bytes, payer: bytes, nonce: bytes, now: float, method: int = EIP3009
    ) -> PayerState | None:
        """The cached state if every part of it is fresh enough, else None."""
        seen = self._no_code.get(token)
        if seen is not None and now - seen <= self.max_age_s:
            return PayerState(False, None, None)
        balance = self._balances.get((token, payer))
        used = self._nonces.get((token, payer, nonce, method))
        if balance is None or used is None or now - balance[1] > self.max_age_s:
            return None
        if not used[0] and now - used[1] > self.max_age_s:
            return None
        if method == EIP3009:
            return PayerState(True, balance[0], used[0])
        allowance = self._allowances.get((token, payer))
        if allowance is None or now - allowance[1] > self.max_age_s:
            return None
        return PayerState(True, balance[0], used[0], allowance[0])

    def put(
        self,
        token: bytes,
        payer: bytes,
        nonce: bytes,
        state: PayerState,
        now: float,
        method: int = EIP3009,
    ) -> None:
        if not state.token_has_code:
            self._no_code[token] = now
            return
        self._no_code.pop(token, None)
        if state.balance is not None:
            self._balances[(token, payer)] = (state.balance, now)
            self._balances.move_to_end((token, payer))
            if len(self._balances) > self.entries_max:
                self._balances.popitem(last=False)
        if state.nonce_used is not None:
            self._nonces[(token, payer, nonce, method)] = (state.nonce_used, now)
            self._nonces.move_to_end((token, payer, nonce, method))
            if len(self._nonces) > self.entries_max:
                self._nonces.popitem(last=False)
        if state.allowance is not None:
            self._allowances[(token, payer)] = (state.allowance, now)
            self._allowances.move_to_end((token, payer))
            if len(self._allowances) > self.entries_max:
                self._allowances.popitem(last=False)


def read_calldata(keys: Sequence[NonceKey]) -> tuple[bytes, list[BalanceKey]]:
    """One aggregate3 call: ``balanceOf`` of each distinct (token, payer), then per key
    ``authorizationState`` (EIP-3009) or Permit2's ``nonceBitmap`` and the token's
    ``allowance`` to Permit2 (two calls), failures allowed. Returns the calldata and the
    balance keys in call order."""
    balance_keys = list(dict.fromkeys((t, p) for t, p, _, _ in keys))
    calls = [(t, True, codec.balance_of_calldata(p)) for t, p in balance_keys]
    for t, p, n, method in keys:
        if method == EIP3009:
            calls.append((t, True, codec.authorization_state_calldata(p, n)))
        else:
            calls.append((PERMIT2, True, permit2.nonce_bitmap_calldata(p, n)))
            calls.append((t, True, permit2.allowance_calldata(p)))
    return codec.aggregate3(calls), balance_keys


def decode_read(
    keys: Sequence[NonceKey], balance_keys: Sequence[BalanceKey], returned: bytes
) -> list[PayerState]:
    """Each key's state from :func:`read_calldata`'s answer. A call that succeeded with no
    return data hit an address without code (no token there)."""
    results = codec.decode_aggregate3_result(returned)
    asked = len(balance_keys) + sum(1 if k[3] == EIP3009 else 2 for k in keys)
    if len(results) != asked:
        raise ValueError("aggregate3 answered a different number of results")
    balances: dict[BalanceKey, tuple[bool, int | None]] = {}
    for key, (ok, data) in zip(balance_keys, results, strict=False):
        no_code = ok and not data
        balances[key] = (
            no_code,
            int.from_bytes(data[:32], "big") if ok and len(data) >= 32 else None,
        )
    out: list[PayerState] = []
    at = len(balance_keys)
    for token, payer, nonce, method in keys:
        no_code, balance = balances[(token, payer)]
        ok, data = results[at]
        at += 1
        if method == EIP3009:
            if no_code or (ok and not data):
                out.append(PayerState(False, None, None))
                continue
            used = int.from_bytes(data[:32], "big") != 0 if ok and len(data) >= 32 else None
            out.append(PayerState(True, balance, used))
            continue
        used = permit2.nonce_used(nonce, data) if ok and len(data) >= 32 else None
        ok, data = results[at]
        at += 1
        if no_code:
            out.append(PayerState(False, None, None))
            continue
        allowance = int.from_bytes(data[:32], "big") if ok and len(data) >= 32 else None
        out.append(PayerState(True, balance, used, allowance))
    return out


class ReaderStatistics(msgspec.Struct, frozen=True):
    reads: int  # eth_calls made
    payments_read: int  # questions answered by those reads
    cache_hits: int
    queued: int


class ChainStateReader:
    """Coalesced, cached reads of :class:`PayerState` through ``aggregate3`` at ``target``
    (the batcher or Multicall3). Run :meth:`run` in a nursery."""

    def __init__(
        self,
        rpc: ChainClient,
        target: bytes,
        clock: Clock,
        *,
        max_age_s: float,
        window_s: float,
        batch_max: int,
        inflight_max: int = 1,
        queue_max: int = 10_000,
    ) -> None:
        self._rpc = rpc
        self._target = target
        self._clock = clock
        self._cache = StateCache(max_age_s)
        self._coalescer: Coalescer[NonceKey, PayerState] = Coalescer(
            self._read,
            window_s=window_s,
            batch_max=batch_max,
            inflight_max=inflight_max,
            queue_max=queue_max,
            what="chain state questions",
        )
        self._cache_hits = 0

    def statistics(self) -> ReaderStatistics:
        c = self._coalescer
        return ReaderStatistics(c.calls, c.answered, self._cache_hits, c.queued())

    async def read(
        self, token: bytes, payer: bytes, nonce: bytes, method: int = EIP3009
    ) -> PayerState:
        """The chain's view of one payment; raises what the read raised (:class:`RpcError`,
        :class:`RpcUnavailable`, a decoding error) when it cannot be read."""
        cached = self._cache.get(token, payer, nonce, self._clock.now(), method)
        if cached is not None:
            self._cache_hits += 1
            return cached
        return await self._coalescer.ask((token, payer, nonce, method))

    async def run(self) -> None:
        await self._coalescer.run()

    async def _read(self, asked: list[NonceKey]) -> list[PayerState]:
        keys = list(dict.fromkeys(asked))
        data, balance_keys = read_calldata(keys)
        returned = await self._rpc.eth_call(self._target, data)
        states = dict(zip(keys, decode_read(keys, balance_keys, returned), strict=True))
        now = self._clock.now()
        for (token, payer, nonce, method), state in states.items():
            self._cache.put(token, payer, nonce, state, now, method)
        return [states[key] for key in asked]
