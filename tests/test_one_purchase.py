"""One payment, one purchase: a settled payment never answers ``success`` twice, ``/verify``
knows the ledger and the chain, ``payment-identifier`` retries get the stored answer, and the
request envelope is as lenient as the reference facilitators' (on a real anvil)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import trio

from engine.chain import codec
from engine.chain.rpc import Rpc
from engine.config import ServiceConfig
from engine.dev.devchain import Deployer, new_key
from engine.dev.loadgen import payment_v1, payment_v2
from engine.model import PaymentPayloadV2
from engine.rules import reasons

from .chain import balances, cancel_calldata, count_authorization_used
from .service_helpers import RunningService, on_chain, running_service

pytestmark = pytest.mark.chain
VALUE = 1000


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    with running_service(tmp_path_factory.mktemp("svc"), payers=20) as running:
        yield running


def _body(payload: Any, req: Any, version: int | None = 2) -> bytes:
    doc: dict[str, Any] = {"paymentPayload": payload, "paymentRequirements": req}
    if version is not None:
        doc["x402Version"] = version
    return msgspec.json.encode(doc)


def _signed(svc: RunningService, i: int, value: int = VALUE) -> tuple[PaymentPayloadV2, Any]:
    dev = svc.dev
    key = dev.payer_key_bytes()[i]
    return payment_v2(dev.domain, key, bytes.fromhex(dev.payee[2:]), value, int(time.time()))


def _post(svc: RunningService, path: str, body: bytes) -> dict[str, Any]:
    r = httpx.post(svc.url + path, content=body, timeout=60)
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


def _payee_balance(svc: RunningService) -> int:
    return int(on_chain(svc, lambda rpc: balances(rpc, svc.dev.token, [svc.dev.payee]))[0])


def _uses(svc: RunningService, payload: PaymentPayloadV2) -> int:
    auth = payload.payload.eip3009
    payer, nonce = bytes.fromhex(auth.from_[2:]), bytes.fromhex(auth.nonce[2:])
    return int(
        on_chain(svc, lambda rpc: count_authorization_used(rpc, svc.dev.token, payer, nonce))
    )


def test_a_settled_payment_answers_success_once_whatever_is_sent_again(
    svc: RunningService,
) -> None:
    before = _payee_balance(svc)
    payload, req = _signed(svc, 0)
    first = _post(svc, "/settle", _body(payload, req))
    assert first["success"] is True and first["transaction"].startswith("0x"), first
    sid = first["extra"]["settlementId"]
    # the same body again, and the same payload under other requirements (another resource)
    other_req = msgspec.structs.replace(req, max_timeout_seconds=30, extra={**req.extra, "x": 1})
    for body in [_body(payload, req), _body(payload, other_req), _body(payload, req, None)]:
        again = _post(svc, "/settle", body)
        assert again["success"] is False, again
        assert again["errorReason"] == "duplicate_settlement", again
        assert again["transaction"] == first["transaction"]
        assert again["extra"]["settlementId"] == sid
        assert again["payer"] == payload.payload.eip3009.from_
    assert _payee_balance(svc) - before == VALUE
    assert _uses(svc, payload) == 1


def test_twenty_concurrent_settles_of_one_payment_get_exactly_one_success(
    svc: RunningService,
) -> None:
    before = _payee_balance(svc)
    payload, req = _signed(svc, 1)
    body = _body(payload, req)
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda _: _post(svc, "/settle", body), range(20)))
    wins = [a for a in answers if a["success"]]
    assert len(wins) == 1, answers
    losses = [a for a in answers if not a["success"]]
    assert {a["errorReason"] for a in losses} == {"duplicate_settlement"}, losses
    assert {a["transaction"] for a in answers} == {wins[0]["transaction"]}
    assert {a["extra"]["settlementId"] for a in answers} == {wins[0]["extra"]["settlementId"]}
    assert _payee_balance(svc) - before == VALUE
    assert _uses(svc, payload) == 1


def test_verify_refuses_what_the_ledger_or_the_chain_already_decided(
    svc: RunningService,
) -> None:
    dev = svc.dev
    payee = bytes.fromhex(dev.payee[2:])
    keys = dev.payer_key_bytes()

    def verify(payload: Any, req: Any) -> dict[str, Any]:
        return _post(svc, "/verify", _body(payload, req))

    # fresh and funded: valid
    fresh = _signed(svc, 2)
    assert verify(*fresh)["isValid"] is True
    # accepted earlier by us
    assert _post(svc, "/settle", _body(*fresh))["success"] is True
    seen = verify(*fresh)
    assert seen["isValid"] is False and seen["invalidReason"] == reasons.NONCE_USED, seen
    # used on chain by someone else's transaction (the payer's wallet, a front-runner)
    used, used_req = _signed(svc, 3)
    deployer = Deployer(Rpc(dev.rpc_url), bytes.fromhex(dev.deployer_key[2:]), dev.chain_id)
    from engine.stages.verify import Verifier

    payment, _ = Verifier(svc.config).check(used, used_req, time.time())
    assert payment is not None
    trio.run(deployer.send, dev.token, codec.transfer_calldata(payment))
    on_chain = verify(used, used_req)
    assert on_chain["isValid"] is False and on_chain["invalidReason"] == reasons.NONCE_USED
    # cancelled by the payer
    cancelled, cancelled_req = _signed(svc, 4)
    nonce = bytes.fromhex(cancelled.payload.eip3009.nonce[2:])
    trio.run(deployer.send, dev.token, cancel_calldata(dev, keys[4], nonce))
    gone = verify(cancelled, cancelled_req)
    assert gone["isValid"] is False and gone["invalidReason"] == reasons.NONCE_USED, gone
    # a payer who holds less than the amount
    poor = payment_v2(dev.domain, new_key(), payee, VALUE, int(time.time()))
    broke = verify(*poor)
    assert broke["isValid"] is False, broke
    assert broke["invalidReason"] == reasons.INSUFFICIENT_FUNDS, broke
    assert broke["payer"] == poor[0].payload.eip3009.from_
    # non-canonical and zero amounts
    padded = msgspec.json.decode(_body(*_signed(svc, 5)))
    padded["paymentPayload"]["payload"]["authorization"]["value"] = "0" + str(VALUE)
    padded["paymentRequirements"]["amount"] = "0" + str(VALUE)
    r = _post(svc, "/verify", msgspec.json.encode(padded))
    assert r["isValid"] is False and r["invalidReason"] == reasons.INVALID_REQUIREMENTS, r
    zero = verify(*_signed(svc, 6, value=0))
    assert zero["isValid"] is False and zero["invalidReason"] == reasons.INVALID_REQUIREMENTS
    metrics = httpx.get(svc.url + "/metrics").text
    assert "x402_state_reads_total" in metrics


def test_payment_identifier_retry_gets_the_stored_answer_and_other_payloads_are_refused(
    svc: RunningService,
) -> None:
    before = _payee_balance(svc)
    payload, req = _signed(svc, 7)
    pid = "pay_" + "7d5d747be160e280504c099d984bcfe0"
    ext = {"payment-identifier": {"info": {"required": False, "id": pid}}}
    with_id = msgspec.structs.replace(payload, extensions=ext)
    first = _post(svc, "/settle", _body(with_id, req))
    assert first["success"] is True, first
    retry = _post(svc, "/settle", _body(with_id, req))
    assert retry["success"] is True, retry  # the same purchase, answered again
    assert retry["transaction"] == first["transaction"]
    assert retry["extra"]["settlementId"] == first["extra"]["settlementId"]
    # the verify a resource server runs before that retry passes too
    assert _post(svc, "/verify", _body(with_id, req))["isValid"] is True
    # without the id it is a replay
    bare = _post(svc, "/settle", _body(payload, req))
    assert bare["success"] is False and bare["errorReason"] == "duplicate_settlement"
    # the same id on another payment is refused, and that payment is not settled
    other, other_req = _signed(svc, 8)
    clash = _post(svc, "/settle", _body(msgspec.structs.replace(other, extensions=ext), other_req))
    assert clash["success"] is False
    assert clash["errorReason"] == "payment_identifier_conflict", clash
    assert _post(svc, "/verify", _body(other, other_req))["isValid"] is True  # still unused
    bad = {"payment-identifier": {"info": {"id": "short"}}}
    refused = _post(
        svc, "/settle", _body(msgspec.structs.replace(other, extensions=bad), other_req)
    )
    assert refused["success"] is False and refused["errorReason"] == reasons.INVALID_PAYLOAD
    assert _payee_balance(svc) - before == VALUE
    supported = httpx.get(svc.url + "/supported").json()
    assert "payment-identifier" in supported["extensions"]


def test_envelope_without_x402_version_and_health_probe(svc: RunningService) -> None:
    payload, req = _signed(svc, 9)
    doc = _post(svc, "/verify", _body(payload, req, version=None))
    assert doc["isValid"] is True, doc
    mismatch = _post(svc, "/verify", _body(payload, req, version=1))
    assert mismatch["isValid"] is False and mismatch["invalidReason"] == reasons.INVALID_VERSION
    v1 = payment_v1(
        svc.dev.domain,
        svc.dev.payer_key_bytes()[10],
        bytes.fromhex(svc.dev.payee[2:]),
        VALUE,
        int(time.time()),
        "anvil",
    )
    assert _post(svc, "/verify", _body(*v1, version=None))["isValid"] is True
    for path in ["/health", "/healthz"]:
        r = httpx.get(svc.url + path)
        assert r.status_code == 200 and r.json()["status"] == "ok"
    # a refusal still names the payer when authorization.from decodes
    broken = msgspec.json.decode(_body(payload, req))
    del broken["paymentPayload"]["payload"]["signature"]
    doc = _post(svc, "/settle", msgspec.json.encode(broken))
    assert doc["success"] is False and doc["payer"] == payload.payload.eip3009.from_


def test_deferred_mode_sells_once_and_checks_the_chain_first(tmp_path: Path) -> None:
    service = ServiceConfig(settlement="deferred")
    with running_service(tmp_path, payers=3, service=service) as svc:
        payload, req = _signed(svc, 0)
        first = _post(svc, "/settle", _body(payload, req))
        assert first["success"] is True and first["transaction"] == "", first
        with ThreadPoolExecutor(10) as pool:
            answers = list(
                pool.map(lambda _: _post(svc, "/settle", _body(payload, req)), range(10))
            )
        assert not any(a["success"] for a in answers), answers
        assert {a["errorReason"] for a in answers} == {"duplicate_settlement"}
        assert {a["extra"]["settlementId"] for a in answers} == {first["extra"]["settlementId"]}
        poor = payment_v2(
            svc.dev.domain, new_key(), bytes.fromhex(svc.dev.payee[2:]), VALUE, int(time.time())
        )
        broke = _post(svc, "/settle", _body(*poor))
        assert broke["success"] is False and broke["errorReason"] == reasons.INSUFFICIENT_FUNDS


async def test_sales_and_payment_identifiers_survive_a_restart(tmp_path: Path) -> None:
    from engine.dev.devchain import Anvil, engine_config, setup_devchain
    from engine.engine import Engine

    with Anvil() as anvil:
        dev = await setup_devchain(anvil.url, payers=3)
        config, env = engine_config(dev, str(tmp_path / "ledger.duckdb"))
        payee = bytes.fromhex(dev.payee[2:])
        now = int(time.time())
        keys = dev.payer_key_bytes()
        plain = payment_v2(dev.domain, keys[0], payee, VALUE, now)
        pid = "pay_restart_0123456789abcdef"
        ext = {"payment-identifier": {"info": {"id": pid}}}
        tagged_payload, tagged_req = payment_v2(dev.domain, keys[1], payee, VALUE, now)
        tagged = (msgspec.structs.replace(tagged_payload, extensions=ext), tagged_req)
        async with Engine.open(config, environ=env) as engine:
            first = await engine.settle(*plain)
            first_tagged = await engine.settle(*tagged)
            assert first.success and first_tagged.success, (first, first_tagged)
        async with Engine.open(config, environ=env) as engine:
            again = await engine.settle(*plain)
            assert not again.success and again.reason == "duplicate_settlement", again
            assert again.transaction == first.transaction
            assert again.settlement_id == first.settlement_id
            retry = await engine.settle(*tagged)
            assert retry.success and retry.transaction == first_tagged.transaction, retry
            bare = await engine.settle(tagged_payload, tagged_req)
            assert not bare.success and bare.reason == "duplicate_settlement"
            other = payment_v2(dev.domain, keys[2], payee, VALUE, now)
            clash = await engine.settle(msgspec.structs.replace(other[0], extensions=ext), other[1])
            assert not clash.success and clash.reason == "payment_identifier_conflict"
            _, refused = await engine.verify(*plain)
            assert refused is not None and refused.reason == reasons.NONCE_USED
            rows = await engine.query("SELECT count(*) FROM sales")
            assert rows == [(2,)]
