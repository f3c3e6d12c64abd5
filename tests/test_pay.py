"""``x402-engine pay``: its decisions, and real payments to our service, to the official SDK's
facilitator and to an SDK resource server, all on one anvil."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import msgspec
import pytest
import trio

from benchmarks.sdk_facilitator import sdk_facilitator, sdk_facilitator_key
from engine.cli import main
from engine.dev.devchain import Anvil, DevChain, setup_devchain
from engine.dev.paystats import (
    Answer,
    ChainView,
    Shape,
    quantile,
    settle_verdict,
    summarize,
    summary_lines,
    verify_verdict,
)

from .service_helpers import RunningService, running_service, sdk_resource_server, token_balances

# ----------------------------------------------------------------------- decisions


def test_a_load_is_always_bounded_and_sane() -> None:
    assert Shape().problem() is not None  # neither a count nor a duration
    assert Shape(count=0).problem() == "--count must be at least 1"
    assert Shape(count=5, rate=0).problem() == "--rate must be positive"
    assert Shape(duration_s=1, concurrency=0).problem() == "--concurrency must be at least 1"
    assert Shape(count=1).problem() is None
    shape = Shape(count=3, duration_s=10, rate=2)
    assert [shape.start_offset_s(i) for i in range(3)] == [0.0, 0.5, 1.0]
    assert shape.more(2, 9.9) and not shape.more(3, 0.0) and not shape.more(0, 10.0)
    assert Shape(duration_s=1).more(10**9, 0.5)  # duration only: no count limit


def test_answers_mean_what_the_facilitator_said() -> None:
    assert settle_verdict({"success": True, "transaction": "0xab", "network": "n"}) == (
        "settled",
        "",
        "0xab",
        "",
    )
    deferred = {"success": True, "transaction": "", "extra": {"settlementId": 7}}
    assert settle_verdict(deferred) == ("accepted", "", "", "7")
    refused = {"success": False, "errorReason": "duplicate_settlement", "transaction": "0xcd"}
    assert settle_verdict(refused)[:2] == ("rejected", "duplicate_settlement")
    assert settle_verdict({"error": "bad"})[0] == "error"
    assert settle_verdict(None)[0] == "error"
    assert verify_verdict({"isValid": True}) is None
    assert verify_verdict({"isValid": False, "invalidReason": "x"}) == "x"
    assert verify_verdict([]) == "not_a_verify_response"


def test_quantiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 1001)]
    assert quantile(values, 0.5) == 500
    assert quantile(values, 0.99) == 990
    assert quantile(values, 0.999) == 999
    assert quantile([3.0], 0.999) == 3.0
    assert math.isnan(quantile([], 0.5))


def test_the_summary_counts_and_fits_80_columns() -> None:
    answers = [Answer("settled", 0.1 * (i + 1), transaction="0x1") for i in range(8)]
    answers += [Answer("accepted", 5.0), Answer("rejected", 0.001, "invalid_payload")]
    answers += [Answer("error", 0.2, "timeout")]
    summary = summarize(
        answers, 2.0, ChainView(found=9, transactions=2, gas_used=900_000, waited_s=1)
    )
    assert (summary.sent, summary.settled, summary.accepted) == (11, 8, 1)
    assert summary.rejected == {"invalid_payload": 1} and summary.errors == {"timeout": 1}
    assert summary.settled_per_s == 4.0
    assert summary.p50_ms == pytest.approx(500.0)  # successes only: 0.1 .. 0.8 s and 5 s
    assert summary.p999_ms == pytest.approx(5000.0)
    lines = summary_lines(summary)
    assert all(len(line) <= 80 for line in lines), lines
    assert "on chain    9 of 9 in 2 transactions, 100,000 gas per payment" in lines


# ------------------------------------------------------------------- real payments


def _devchain_dir(tmp: Path, dev: DevChain) -> str:
    directory = tmp / "devchain"
    directory.mkdir(exist_ok=True)
    (directory / "devchain.json").write_bytes(msgspec.json.encode(dev))
    return str(directory)


def _payee_balance(svc: RunningService) -> int:
    return token_balances(svc, [svc.dev.payee])[0]


@pytest.mark.chain
def test_pay_one_then_a_load_through_our_service(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with running_service(tmp_path, payers=10) as svc:
        devchain = _devchain_dir(tmp_path, svc.dev)
        before = _payee_balance(svc)
        assert main(["pay", "--facilitator", svc.url, "--devchain", devchain]) == 0
        out = capsys.readouterr().out
        assert "answer      settled" in out, out
        settlement = next(line for line in out.splitlines() if line.startswith("look it up"))
        assert settlement.startswith(f"look it up  curl -s {svc.url}/settlements/")
        assert "on chain    1 of 1 in 1 transactions" in out, out

        summary_file = tmp_path / "load.json"
        code = main(
            f"pay --facilitator {svc.url} --devchain {devchain} --count 40 --concurrency 20"
            f" --amount 7 --json {summary_file}".split()
        )
        assert code == 0, capsys.readouterr()
        summary = json.loads(summary_file.read_text())["summary"]
        assert summary["settled"] == 40 and summary["rejected"] == {} and summary["errors"] == {}
        assert summary["chain"]["found"] == 40
        assert summary["chain"]["transactions"] < 40 // 4  # batched: a few transactions
        assert summary["chain"]["gas_used"] > 0
        assert _payee_balance(svc) - before == 1000 + 40 * 7


@pytest.mark.chain
def test_pay_the_official_sdk_facilitator_and_an_sdk_resource_server(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same tool against another facilitator (one transaction per payment) and against a
    resource server (402, then the paid retry) that settles through our service."""
    with running_service(tmp_path, payers=10) as svc:
        devchain = _devchain_dir(tmp_path, svc.dev)
        key = sdk_facilitator_key(svc.dev)
        with sdk_facilitator(svc.anvil.url, svc.dev.chain_id, key) as sdk_url:
            summary_file = tmp_path / "sdk.json"
            code = main(
                f"pay --facilitator {sdk_url} --devchain {devchain} --count 6"
                f" --concurrency 3 --json {summary_file}".split()
            )
            assert code == 0, capsys.readouterr()
            summary = json.loads(summary_file.read_text())["summary"]
            assert summary["settled"] == 6 and summary["chain"]["found"] == 6
            assert summary["chain"]["transactions"] == 6  # the SDK: one each

        with sdk_resource_server(svc) as url:
            before = _payee_balance(svc)
            summary_file = tmp_path / "resource.json"
            code = main(
                f"pay --resource {url}/paid --devchain {devchain} --count 3"
                f" --json {summary_file}".split()
            )
            assert code == 0, capsys.readouterr()
            summary = json.loads(summary_file.read_text())["summary"]
            assert summary["settled"] == 3 and summary["chain"]["found"] == 3
            assert _payee_balance(svc) - before == 3 * 1000  # the server's price, $0.001


def test_pay_mistakes_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = ["pay", "--facilitator", "http://127.0.0.1:9", "--devchain", str(tmp_path)]
    assert main(missing) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "run x402-engine devchain" in err, err
    keys = tmp_path / "keys.txt"
    keys.write_text("0x1234\n")
    bad_key = ["pay", "--facilitator", "http://127.0.0.1:9", "--key-file", str(keys)]
    assert main([*bad_key, "--rpc", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "line 1: not a 32-byte hex private key" in err, err
    assert main([*bad_key]) == 2
    assert "needs --rpc" in capsys.readouterr().err
    assert main([*missing, "--count", "0"]) == 2
    assert "--count must be at least 1" in capsys.readouterr().err
    (tmp_path / "devchain.json").write_text("{not json")
    assert main(missing) == 2
    assert "is not a devchain's file" in _one_line_err(capsys)
    assert main([*missing, "--rate", "100"]) == 2
    assert "a load needs --count or --duration" in capsys.readouterr().err


@pytest.mark.chain
def test_pay_catches_a_facilitator_that_answers_settled_without_settling(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], anvil: Anvil
) -> None:
    """What an operator saw from outside after a devchain reset: `success` with a transaction
    hash, and nothing on chain. pay checks every such answer against the token's logs."""
    dev = trio.run(lambda: setup_devchain(anvil.url, payers=2))
    devchain = _devchain_dir(tmp_path, dev)

    class Liar(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._send(
                {"kinds": [{"x402Version": 2, "scheme": "exact", "network": "eip155:31337"}]}
            )

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["content-length"]))
            if self.path == "/verify":
                self._send({"isValid": True})
            else:
                self._send({"success": True, "transaction": "0x" + "ab" * 32, "network": "n"})

        def _send(self, doc: object) -> None:
            body = json.dumps(doc).encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Liar)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        code = main(f"pay --facilitator {url} --devchain {devchain} --count 3 --wait 1".split())
    finally:
        server.shutdown()
        server.server_close()
    out = capsys.readouterr().out
    assert code == 1, out
    assert "settled     3 with a transaction" in out, out
    assert "on chain    0 of 3 in 0 transactions" in out, out
    assert "NOT FOUND   3 answered settled with a transaction are not on chain" in out, out


def _one_line_err(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err
