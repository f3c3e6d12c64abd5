"""Chain state for /verify without a chain: the judgement, the cache's ages, the aggregate3
decoding, and many concurrent questions answered by few reads (a mock JSON-RPC transport)."""

from __future__ import annotations

import os

import httpx
import msgspec
import trio
from eth_abi.abi import decode as abi_decode
from eth_abi.abi import encode as abi_encode

from engine.chain import codec
from engine.chain.rpc import Rpc
from engine.clock import ManualClock
from engine.model import Payment
from engine.rules import reasons
from engine.stages.chainstate import ChainStateReader, PayerState, StateCache, decode_read, judge

TOKEN = b"\x11" * 20


def _payment(value: int = 10) -> Payment:
    return Payment(
        8453,
        TOKEN,
        os.urandom(20),
        b"\x22" * 20,
        value,
        0,
        2**40,
        os.urandom(32),
        os.urandom(65),
        "base",
        2,
    )


def test_judge_names_each_refusal() -> None:
    p = _payment(10)
    assert judge(p, PayerState(True, 10, False)) is None
    cases = [
        (PayerState(False, None, None), reasons.ASSET_NOT_DEPLOYED),
        (PayerState(True, None, False), reasons.UNEXPECTED_VERIFY),
        (PayerState(True, 10, True), reasons.NONCE_USED),
        (PayerState(True, 9, False), reasons.INSUFFICIENT_FUNDS),
    ]
    for state, reason in cases:
        rejected = judge(p, state)
        assert rejected is not None and rejected.reason == reason, (state, rejected)
        assert rejected.payer == "0x" + p.payer.hex()


def test_cache_keeps_answers_for_their_age_and_used_nonces_for_good() -> None:
    cache = StateCache(max_age_s=1.0)
    payer, nonce, other = b"\x01" * 20, b"\x02" * 32, b"\x03" * 32
    cache.put(TOKEN, payer, nonce, PayerState(True, 50, False), now=100.0)
    assert cache.get(TOKEN, payer, nonce, 100.9) == PayerState(True, 50, False)
    assert cache.get(TOKEN, payer, nonce, 101.1) is None  # too old
    assert cache.get(TOKEN, payer, other, 100.5) is None  # that nonce was never read
    cache.put(TOKEN, payer, other, PayerState(True, 50, True), now=100.0)
    cache.put(TOKEN, payer, nonce, PayerState(True, 40, False), now=105.0)
    # a used nonce stays used; the balance beside it must still be fresh
    assert cache.get(TOKEN, payer, other, 105.5) == PayerState(True, 40, True)
    cache.put(TOKEN, payer, nonce, PayerState(False, None, None), now=106.0)
    assert cache.get(TOKEN, b"\x09" * 20, nonce, 106.5) == PayerState(False, None, None)


def _answer(calldata: bytes, balances: dict[bytes, int], used: set[bytes]) -> bytes:
    """What a token behind aggregate3 answers to read_calldata (no code at other addresses)."""
    (calls,) = abi_decode(["(address,bool,bytes)[]"], calldata[4:])
    results = []
    for target, _, data in calls:
        if bytes.fromhex(target[2:]) != TOKEN:
            results.append((True, b""))
        elif data[:4] == codec.BALANCE_OF:
            results.append((True, balances.get(data[16:36], 0).to_bytes(32, "big")))
        else:
            results.append((True, (1 if data[36:68] in used else 0).to_bytes(32, "big")))
    return abi_encode(["(bool,bytes)[]"], [results])


def test_decode_read_sees_a_token_without_code() -> None:
    payer, nonce = b"\x01" * 20, b"\x02" * 32
    from engine.stages.chainstate import read_calldata

    keys = [(b"\x99" * 20, payer, nonce, 0), (TOKEN, payer, nonce, 0)]
    data, balance_keys = read_calldata(keys)
    states = decode_read(keys, balance_keys, _answer(data, {payer: 5}, set()))
    assert states == [PayerState(False, None, None), PayerState(True, 5, False)]


async def test_many_concurrent_questions_share_a_few_reads() -> None:
    payments = [_payment() for _ in range(300)]
    balances = {p.payer: 100 for p in payments[::2]}
    used = {payments[1].nonce}
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = msgspec.json.decode(request.content)
        assert body["method"] == "eth_call"
        data = bytes.fromhex(body["params"][0]["data"][2:])
        calls.append(1)
        answer = _answer(data, balances, used)
        return httpx.Response(
            200, json={"jsonrpc": "2.0", "id": body["id"], "result": "0x" + answer.hex()}
        )

    rpc = Rpc("http://127.0.0.1:1", transport=httpx.MockTransport(handler))
    reader = ChainStateReader(
        rpc, b"\x33" * 20, ManualClock(1000.0), max_age_s=1.0, window_s=0.002, batch_max=128
    )
    answers: dict[int, PayerState] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader.run)

        async def ask(i: int) -> None:
            p = payments[i]
            answers[i] = await reader.read(p.token, p.payer, p.nonce)

        async with trio.open_nursery() as askers:
            for i in range(len(payments)):
                askers.start_soon(ask, i)
        again = await reader.read(payments[0].token, payments[0].payer, payments[0].nonce)
        nursery.cancel_scope.cancel()
    await rpc.aclose()
    assert len(calls) == 3  # 300 questions, batches of at most 128
    assert answers[0] == PayerState(True, 100, False) == again  # the last from the cache
    assert answers[1] == PayerState(True, 0, True)
    stats = reader.statistics()
    assert (stats.reads, stats.payments_read, stats.cache_hits) == (3, 300, 1)
