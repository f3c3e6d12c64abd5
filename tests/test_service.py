"""The HTTP facilitator: the x402 facilitator API, modes, idempotency, limits, auth, metrics."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import msgspec
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.config import ConfigError, PolicyConfig, ServiceConfig
from engine.dev.loadgen import payment_v1, payment_v2

from .service_helpers import RunningService, running_service, token_balances

pytestmark = pytest.mark.chain
VALUE = 1000


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    with running_service(tmp_path_factory.mktemp("svc"), payers=40) as running:
        yield running


def _body(payload: object, req: object, version: int = 2) -> bytes:
    return msgspec.json.encode(
        {"x402Version": version, "paymentPayload": payload, "paymentRequirements": req}
    )


def _payment(svc: RunningService, i: int, version: int = 2) -> bytes:
    dev = svc.dev
    key = dev.payer_key_bytes()[i]
    payee = bytes.fromhex(dev.payee[2:])
    if version == 1:
        return _body(*payment_v1(dev.domain, key, payee, VALUE, int(time.time()), "anvil"), 1)
    return _body(*payment_v2(dev.domain, key, payee, VALUE, int(time.time())))


def _payee_balance(svc: RunningService) -> int:
    return token_balances(svc, [svc.dev.payee])[0]


def test_supported_lists_v1_and_v2_kinds_and_the_signer(svc: RunningService) -> None:
    doc = httpx.get(svc.url + "/supported").json()
    methods = {"assetTransferMethods": ["eip3009", "permit2"]}  # the devchain has Permit2
    upto = {"facilitatorAddress": svc.dev.upto_batcher}
    assert doc["kinds"] == [
        {"x402Version": 2, "scheme": "exact", "network": "eip155:31337", "extra": methods},
        {"x402Version": 1, "scheme": "exact", "network": "anvil", "extra": methods},
        {"x402Version": 2, "scheme": "upto", "network": "eip155:31337", "extra": upto},
    ]
    assert len(doc["signers"]["eip155:*"]) == 1


def test_verify_answers_200_with_reason_codes(svc: RunningService) -> None:
    good = _payment(svc, 0)
    r = httpx.post(svc.url + "/verify", content=good)
    assert r.status_code == 200 and r.json()["isValid"] is True
    assert r.json()["payer"].startswith("0x")
    bad = msgspec.json.decode(good)
    bad["paymentRequirements"]["amount"] = "999"
    r = httpx.post(svc.url + "/verify", content=msgspec.json.encode(bad))
    assert r.status_code == 200
    assert r.json() == {
        "isValid": False,
        "invalidReason": "invalid_exact_evm_payload_authorization_value_mismatch",
        "invalidMessage": "authorization.value differs from the amount",
        "payer": r.json()["payer"],
    }
    v3 = msgspec.json.decode(good)
    v3["x402Version"] = 3
    r = httpx.post(svc.url + "/verify", content=msgspec.json.encode(v3))
    assert r.status_code == 200 and r.json()["invalidReason"] == "invalid_x402_version"


def test_settle_confirmed_v1_and_v2_answer_with_the_batch_transaction(svc: RunningService) -> None:
    before = _payee_balance(svc)
    with ThreadPoolExecutor(4) as pool:
        answers = list(
            pool.map(
                lambda body: httpx.post(svc.url + "/settle", content=body, timeout=60),
                [_payment(svc, 1), _payment(svc, 2, version=1), _payment(svc, 3)],
            )
        )
    bodies = [a.json() for a in answers]
    assert all(a.status_code == 200 for a in answers)
    assert all(b["success"] is True and b["transaction"].startswith("0x") for b in bodies), bodies
    assert [b["network"] for b in bodies] == ["eip155:31337", "anvil", "eip155:31337"]
    assert all(b["amount"] == str(VALUE) for b in bodies)
    assert _payee_balance(svc) - before == 3 * VALUE
    sid = bodies[0]["extra"]["settlementId"]
    record = httpx.get(f"{svc.url}/settlements/{sid}").json()
    assert record["state"] == "settled" and record["transaction"] == bodies[0]["transaction"]
    assert [h["state"] for h in record["history"]] == ["submitted", "settled"]
    # one key style, the x402 wire's (camelCase), at every level of the document
    keys = set(record) | {k for event in record["history"] for k in event}
    assert all("_" not in k for k in keys), sorted(keys)
    settled = record["history"][-1]
    assert settled["transaction"] == record["transaction"] and settled["blockNumber"] > 0
    assert settled["gasUsed"] > 0 and int(settled["feeWei"]) > 0 and settled["atMs"] > 0


def test_failed_settlement_is_200_with_the_reason(svc: RunningService) -> None:
    from engine.dev.devchain import new_key
    from engine.dev.loadgen import payment_v2 as sign

    dev = svc.dev
    payload, req = sign(
        dev.domain, new_key(), bytes.fromhex(dev.payee[2:]), VALUE, int(time.time())
    )
    r = httpx.post(svc.url + "/settle", content=_body(payload, req), timeout=60)
    assert r.status_code == 200
    assert r.json()["success"] is False and r.json()["errorReason"] == "insufficient_funds"
    assert r.json()["transaction"] == ""


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/settle", b"not json", 400),
        ("POST", "/settle", b"[1, 2]", 400),
        ("POST", "/verify", b'{"x402Version": 2}', 400),
        ("POST", "/verify", b"x" * 70_000, 413),
        ("GET", "/verify", b"", 405),
        ("GET", "/nope", b"", 404),
        ("GET", "/settlements/abc", b"", 404),
        ("GET", "/settlements/999999", b"", 404),
    ],
)
def test_bad_requests_get_json_errors(
    svc: RunningService, method: str, path: str, body: bytes, status: int
) -> None:
    r = httpx.request(method, svc.url + path, content=body)
    assert r.status_code == status
    assert "error" in r.json()


def test_metrics_are_prometheus_text(svc: RunningService) -> None:
    r = httpx.get(svc.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in [
        "x402_payments_accepted_total",
        "x402_payments_settled_total",
        'x402_queue_depth{chain_id="31337"}',
        'x402_payee_queue_depth{chain_id="31337",payee=""}',
        'x402_credit_refused_total{chain_id="31337"}',
        'x402_credit_shortfalls_total{chain_id="31337"}',
        "x402_batches_mined_total",
        "x402_gas_used_total",
        'x402_http_request_seconds_bucket{le="+Inf",route="settle"}',
        "process_resident_memory_bytes",  # process metrics come with prometheus_client
        "x402_settlement_seconds_count",
    ]:
        assert name in text, name


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=20), inner, max_size=5)
    ),
    max_leaves=30,
)


def _hostile_bodies() -> st.SearchStrategy[bytes]:
    envelope = st.fixed_dictionaries(
        {
            "x402Version": st.sampled_from([1, 2, 3, -1, "2", None]),
            "paymentPayload": json_values,
            "paymentRequirements": json_values,
        }
    )
    return st.one_of(
        st.binary(max_size=2000),
        json_values.map(msgspec.json.encode),
        envelope.map(msgspec.json.encode),
    )


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    path=st.sampled_from(["/verify", "/settle"]),
    body=_hostile_bodies(),
    header=st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=200),
)
def test_hostile_input_gets_well_formed_errors_and_stores_nothing(
    svc: RunningService, path: str, body: bytes, header: str
) -> None:
    accepted_before = _metric(svc, "x402_payments_accepted_total")
    r = httpx.post(svc.url + path, content=body, headers={"x-junk": header}, timeout=30)
    assert r.status_code in (200, 400), r.text
    doc = r.json()
    if r.status_code == 200:
        assert doc.get("isValid") is False or doc.get("success") is False
    else:
        assert isinstance(doc["error"], str)
    assert _metric(svc, "x402_payments_accepted_total") == accepted_before
    assert httpx.get(svc.url + "/healthz").status_code == 200


def _metric(svc: RunningService, name: str) -> float:
    for line in httpx.get(svc.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(name)


def test_oversized_headers_are_refused_and_service_keeps_serving(svc: RunningService) -> None:
    r = httpx.post(svc.url + "/verify", content=b"{}", headers={"x-big": "a" * 20_000})
    assert r.status_code in (400, 413, 431)
    assert httpx.get(svc.url + "/healthz").status_code == 200


def test_deferred_mode_answers_when_durable_and_settles_later(tmp_path: Path) -> None:
    with running_service(tmp_path, payers=3, service=ServiceConfig(settlement="deferred")) as svc:
        r = httpx.post(svc.url + "/settle", content=_payment(svc, 0), timeout=30)
        doc = r.json()
        assert r.status_code == 200 and doc["success"] is True and doc["transaction"] == ""
        sid = doc["extra"]["settlementId"]
        deadline = time.monotonic() + 30
        while True:
            record = httpx.get(f"{svc.url}/settlements/{sid}").json()
            if record["final"] or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert record["state"] == "settled" and record["transaction"].startswith("0x")


def test_bearer_token_guards_verify_and_settle(tmp_path: Path) -> None:
    service = ServiceConfig(bearer_token_env="X402_SETTLE_TOKEN")
    env = {"X402_SETTLE_TOKEN": "s3cret-token"}
    with running_service(tmp_path, payers=1, service=service, environ=env) as svc:
        body = _payment(svc, 0)
        assert httpx.post(svc.url + "/verify", content=body).status_code == 401
        wrong = {"authorization": "Bearer nope"}
        assert httpx.post(svc.url + "/settle", content=body, headers=wrong).status_code == 401
        right = {"authorization": "Bearer s3cret-token"}
        r = httpx.post(svc.url + "/verify", content=body, headers=right)
        assert r.status_code == 200 and r.json()["isValid"] is True
        assert httpx.get(svc.url + "/supported").status_code == 200


def test_public_bind_without_token_is_refused() -> None:
    from engine.service.app import bearer_token

    with pytest.raises(ConfigError, match="not loopback"):
        bearer_token(ServiceConfig(host="0.0.0.0"), {})
    assert bearer_token(ServiceConfig(host="0.0.0.0", allow_public_without_token=True), {}) is None
    assert bearer_token(ServiceConfig(host="::1"), {}) is None


def test_a_thousand_concurrent_settles_share_a_handful_of_transactions(tmp_path: Path) -> None:
    from benchmarks.http_load import post_all

    # Batches leave only when full (the wait is longer than the test), so the count below is
    # what the design guarantees whatever the machine's speed: 1,000 / 250 transactions.
    policy = PolicyConfig(max_batch_size=250, max_wait_ms=600_000)
    with running_service(tmp_path, payers=1000, policy=policy) as svc:
        before = _payee_balance(svc)
        bodies = [_payment(svc, i) for i in range(1000)]
        answers = trio.run(post_all, svc.url, "/settle", bodies, 1000)
        docs = [msgspec.json.decode(a.body) for a in answers]
        assert all(a.status == 200 for a in answers)
        assert all(d["success"] for d in docs), [d for d in docs if not d["success"]][:3]
        transactions = {d["transaction"] for d in docs}
        assert len(transactions) == 4, len(transactions)  # batched, not 1,000
        assert _payee_balance(svc) - before == 1000 * VALUE
