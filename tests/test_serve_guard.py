"""``x402-engine serve`` refuses to listen beyond loopback without a bearer token, however the
address is chosen: the configuration, ``--bind`` or the environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import (
    ChainConfig,
    EngineConfig,
    LedgerConfig,
    ServiceConfig,
    TokenConfig,
    dump_config,
)
from engine.service.app import effective_bind, is_loopback_bind

ROOT = Path(__file__).resolve().parent.parent


def _config(tmp_path: Path, service: ServiceConfig) -> Path:
    config = EngineConfig(
        chains=[
            ChainConfig(
                chain_id=31337,
                rpc_url="http://127.0.0.1:1",  # never reached: the guard runs first
                batcher="0x" + "33" * 20,
                tokens=[TokenConfig(address="0x" + "11" * 20, name="USD Coin", version="2")],
                signer_key_envs=["X402_TEST_KEY"],
            )
        ],
        ledger=LedgerConfig(path=str(tmp_path / "ledger.duckdb")),
        service=service,
    )
    path = tmp_path / "engine.toml"
    path.write_bytes(dump_config(config))
    return path


def _serve(
    config: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "X402_ENGINE_BIND"}
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", "serve", "--config", str(config), *args],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("service", "args", "env"),
    [
        (ServiceConfig(host="0.0.0.0"), [], {}),
        (ServiceConfig(), ["--bind", "0.0.0.0:4022"], {}),
        (ServiceConfig(), ["--bind", "[::]:4022"], {}),
        (ServiceConfig(), [], {"X402_ENGINE_BIND": "0.0.0.0:4022"}),
    ],
    ids=["config", "bind-flag", "bind-flag-ipv6", "environment"],
)
def test_public_address_without_token_refuses_to_start_with_one_line(
    tmp_path: Path, service: ServiceConfig, args: list[str], env: dict[str, str]
) -> None:
    done = _serve(_config(tmp_path, service), *args, env=env)
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert "not loopback" in lines[0] and "bearer_token_env" in lines[0], lines[0]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "ledger.duckdb").exists()  # refused before opening anything


def test_bind_precedence_and_loopback_forms() -> None:
    service = ServiceConfig(host="127.0.0.1", port=4021)
    assert effective_bind(service, None, {}) == "127.0.0.1:4021"
    assert effective_bind(service, None, {"X402_ENGINE_BIND": "0.0.0.0:9"}) == "0.0.0.0:9"
    assert effective_bind(service, "[::1]:5", {"X402_ENGINE_BIND": "0.0.0.0:9"}) == "[::1]:5"
    for local in ["127.0.0.1:1", "localhost:1", "[::1]:1", "127.8.9.1:80", "unix:/tmp/x.sock"]:
        assert is_loopback_bind(local), local
    for public in ["0.0.0.0:1", "[::]:1", "10.0.0.1:80", "example.com:80", ":4021", "fd://3"]:
        assert not is_loopback_bind(public), public
