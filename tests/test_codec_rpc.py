"""Calldata layout, revert decoding, fee policy and RPC retries: pure or with a mock transport."""

from __future__ import annotations

import os

import httpx
import msgspec
import pytest
from eth_abi.abi import encode as abi_encode

from engine.chain import codec
from engine.chain.rpc import Rpc, RpcError, RpcUnavailable
from engine.model import Payment
from engine.rules import reasons
from engine.rules.fees import choose_fees
from engine.stages.confirm import split_evenly


def test_compact_item_is_165_packed_bytes_in_contract_order() -> None:
    sig = os.urandom(64) + b"\x1c"
    p = Payment(
        chain_id=1,
        token=b"\xaa" * 20,
        payer=b"\x01" * 20,
        payee=b"\x02" * 20,
        value=2**128 - 1,
        valid_after=5,
        valid_before=2**48 - 1,
        nonce=b"\x03" * 32,
        signature=sig,
        network="base",
        x402_version=2,
    )
    item = codec.pack_item(p)
    assert len(item) == codec.ITEM_SIZE == 165
    assert item[0:20] == p.payer and item[20:40] == p.payee
    assert item[40:56] == b"\xff" * 16
    assert int.from_bytes(item[56:62], "big") == 5 and item[62:68] == b"\xff" * 6
    assert item[68:100] == p.nonce and item[100:164] == sig[:64] and item[164] == 0x1C


def test_revert_data_maps_to_x402_reasons() -> None:
    def err(text: str) -> bytes:
        return codec.ERROR_STRING + abi_encode(["string"], [text])

    assert codec.failure_reason(err("ERC20: transfer amount exceeds balance"))[0] == (
        reasons.INSUFFICIENT_FUNDS
    )
    assert codec.failure_reason(err("FiatTokenV2: authorization is expired"))[0] == (
        reasons.VALID_BEFORE
    )
    assert codec.failure_reason(err("FiatTokenV2: authorization is used or canceled"))[0] == (
        reasons.NONCE_USED
    )
    assert codec.failure_reason(b"")[0] == reasons.UNEXPECTED_SETTLE
    assert codec.revert_message(b"\x01\x02") == "0x0102"


def test_gas_shares_add_up_exactly() -> None:
    shares = split_evenly(1_000_003, 7)
    assert sum(shares) == 1_000_003 and max(shares) - min(shares) <= 1


def test_fees_stay_under_the_cap_or_wait() -> None:
    fees = choose_fees(base_fee=10, priority_fee=1, max_fee_cap=100)
    assert fees is not None and fees.max_fee_per_gas == 21 and fees.max_priority_fee_per_gas == 1
    capped = choose_fees(base_fee=60, priority_fee=1, max_fee_cap=100)
    assert capped is not None and capped.max_fee_per_gas == 100
    assert choose_fees(base_fee=100, priority_fee=1, max_fee_cap=100) is None


async def test_rpc_retries_transport_faults_then_succeeds() -> None:
    calls = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if calls["n"] <= 2:
            return httpx.Response(503)
        if calls["n"] == 3:
            raise httpx.ConnectError("refused")
        body = msgspec.json.decode(request.content)
        return httpx.Response(200, json={"jsonrpc": "2.0", "id": body["id"], "result": "0x2105"})

    rpc = Rpc("http://127.0.0.1:1", transport=httpx.MockTransport(handler), backoff_s=0.001)
    assert await rpc.chain_id() == 8453
    assert calls["n"] == 4
    await rpc.aclose()


async def test_rpc_gives_up_after_bounded_retries_and_returns_json_rpc_errors() -> None:
    def down(request: httpx.Request) -> httpx.Response:
        return httpx.Response(502)

    rpc = Rpc(
        "http://127.0.0.1:1", transport=httpx.MockTransport(down), retries_max=2, backoff_s=0.001
    )
    with pytest.raises(RpcUnavailable):
        await rpc.chain_id()
    await rpc.aclose()

    def error(request: httpx.Request) -> httpx.Response:
        body = msgspec.json.decode(request.content)
        return httpx.Response(
            200,
            json={
                "jsonrpc": "2.0",
                "id": body["id"],
                "error": {"code": 3, "message": "execution reverted", "data": "0x08c379a0"},
            },
        )

    rpc = Rpc("http://127.0.0.1:1", transport=httpx.MockTransport(error))
    with pytest.raises(RpcError) as info:
        await rpc.call("eth_call", [])
    assert info.value.revert_data == bytes.fromhex("08c379a0")
    await rpc.aclose()


def test_hand_encoded_aggregate3_matches_eth_abi_both_ways() -> None:
    import os

    from eth_abi.abi import decode as abi_decode
    from eth_abi.abi import encode as abi_encode

    from engine.chain import codec

    for n in [0, 1, 3, 17]:
        calls = [(os.urandom(20), bool(i % 2), os.urandom(i * 7 % 70)) for i in range(n)]
        ours = codec.aggregate3(calls)
        assert ours == codec.AGGREGATE3 + abi_encode(["(address,bool,bytes)[]"], [calls])
        results = [(bool(i % 3), os.urandom(i * 13 % 90)) for i in range(n)]
        encoded = abi_encode(["(bool,bytes)[]"], [results])
        assert codec.decode_aggregate3_result(encoded) == results
        assert abi_decode(["(bool,bytes)[]"], encoded) == (tuple(results),)
    good = abi_encode(["(bool,bytes)[]"], [[(True, b"\x01" * 40)]])
    for broken in [good[:-40], good[:64], (2**200).to_bytes(32, "big") + good[32:], b""]:
        with pytest.raises(ValueError):
            codec.decode_aggregate3_result(broken)


def test_a_used_authorization_without_its_transfer_event_is_a_failure() -> None:
    """As the reference facilitator checks: AuthorizationUsed proves the nonce was spent, the
    token's Transfer(payer, payee, value) that the payment is (a fee-on-transfer or otherwise
    non-standard token moves something else)."""
    import os

    from engine.chain import codec
    from engine.model import Payment
    from engine.rules import reasons

    token, batcher, payee = os.urandom(20), os.urandom(20), os.urandom(20)

    def item(value: int) -> Payment:
        return Payment(
            chain_id=1,
            token=token,
            payer=os.urandom(20),
            payee=payee,
            value=value,
            valid_after=0,
            valid_before=2**40,
            nonce=os.urandom(32),
            signature=b"\x00" * 65,
            network="base",
            x402_version=2,
        )

    def topic(raw: bytes) -> str:
        return "0x" + raw.rjust(32, b"\x00").hex()

    def used(p: Payment) -> codec.Log:
        topics = ["0x" + codec.AUTHORIZATION_USED.hex(), topic(p.payer), "0x" + p.nonce.hex()]
        return codec.Log("0x" + token.hex(), topics, "0x")

    def moved(p: Payment, value: int) -> codec.Log:
        topics = ["0x" + codec.TRANSFER.hex(), topic(p.payer), topic(p.payee)]
        return codec.Log("0x" + token.hex(), topics, "0x" + value.to_bytes(32, "big").hex())

    exact, short, twice = item(1000), item(1000), item(500)
    logs = [used(exact), moved(exact, 1000), used(short), moved(short, 990), used(twice)]
    logs.append(moved(twice, 500))
    receipt = codec.Receipt("0x" + "ab" * 32, "0x1", "0x" + "cd" * 32, "0x1", "0x5208", logs=logs)
    outcomes = codec.item_outcomes(receipt, batcher, token, [exact, short, twice])
    assert [o.status for o in outcomes] == [
        codec.ItemStatus.SETTLED,
        codec.ItemStatus.FAILED,
        codec.ItemStatus.SETTLED,
    ]
    assert outcomes[1].reason == reasons.TRANSFER_EVENT_MISMATCH
    # one Transfer log vouches for one item: two identical payments need two
    same = [exact, exact]
    receipt.logs = [used(exact), moved(exact, 1000)]
    assert [o.status for o in codec.item_outcomes(receipt, batcher, token, same)] == [
        codec.ItemStatus.SETTLED,
        codec.ItemStatus.FAILED,
    ]
