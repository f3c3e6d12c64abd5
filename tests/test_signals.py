"""``x402-engine serve`` stops gracefully on SIGTERM (docker stop, systemd) and SIGINT
(Ctrl-C): it stops accepting, lets requests in flight finish, closes the ledger and exits 0."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import msgspec
import pytest
import trio

from engine.config import ServiceConfig, dump_config
from engine.dev.devchain import Anvil, engine_config, free_port, setup_devchain
from engine.dev.loadgen import payment_v2
from engine.store.ledger import Ledger

pytestmark = pytest.mark.chain
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_drains_and_exits_zero_on_a_signal(tmp_path: Path, signum: signal.Signals) -> None:
    with Anvil() as anvil:
        dev = trio.run(lambda: setup_devchain(anvil.url, payers=2))
        config, env = engine_config(dev, str(tmp_path / "ledger.duckdb"))
        port = free_port()
        config = msgspec.structs.replace(
            config, service=ServiceConfig(port=port, settlement="deferred")
        )
        (tmp_path / "engine.toml").write_bytes(dump_config(config))
        (tmp_path / "signer.env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))
        config_path, env_path = str(tmp_path / "engine.toml"), str(tmp_path / "signer.env")
        command = [sys.executable, "-m", "engine.cli", "serve", "--config", config_path]
        server = subprocess.Popen(
            [*command, "--env-file", env_path],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(url + "/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline and server.poll() is None, server.stderr
                time.sleep(0.1)
            payee = bytes.fromhex(dev.payee[2:])
            for key in dev.payer_key_bytes():
                payload, req = payment_v2(dev.domain, key, payee, 1000, int(time.time()))
                body = msgspec.json.encode(
                    {"x402Version": 2, "paymentPayload": payload, "paymentRequirements": req}
                )
                assert httpx.post(url + "/settle", content=body, timeout=30).json()["success"]
            server.send_signal(signum)
            code = server.wait(timeout=60)
            _, stderr = server.communicate()
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
        assert code == 0, stderr
        assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
        assert "draining" in stderr
        journal = tmp_path / "ledger.duckdb.journal"
        assert not any(journal.glob("*.seg")) or all(
            p.stat().st_size == 0 for p in journal.glob("*.seg")
        )  # closed cleanly: DuckDB holds everything
        ledger = Ledger(tmp_path / "ledger.duckdb")
        assert ledger.query("SELECT count(*) FROM payments") == [(2,)]
        ledger.close()
