from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from engine.chain import crypto
from engine.config import ChainConfig, EngineConfig, LedgerConfig, TokenConfig
from engine.dev.devchain import Anvil
from engine.dev.loadgen import TokenDomain

TOKEN = bytes.fromhex("1111111111111111111111111111111111111111")
PAYEE = bytes.fromhex("2222222222222222222222222222222222222222")


@pytest.fixture
def domain() -> TokenDomain:
    return TokenDomain(8453, TOKEN, "USD Coin", "2")


@pytest.fixture
def offline_config(tmp_path: object) -> EngineConfig:
    return EngineConfig(
        chains=[
            ChainConfig(
                chain_id=8453,
                rpc_url="http://127.0.0.1:1",
                batcher="0x" + "33" * 20,
                tokens=[TokenConfig(address="0x" + TOKEN.hex(), name="USD Coin", version="2")],
                signer_key_envs=["X402_TEST_KEY"],
                network_names=["base"],
            )
        ],
        ledger=LedgerConfig(path=":memory:"),
    )


@pytest.fixture
def payer_key() -> bytes:
    return os.urandom(32)


@pytest.fixture
def payer(payer_key: bytes) -> bytes:
    return crypto.private_key_address(payer_key)


@pytest.fixture
def now() -> int:
    return int(time.time())


@pytest.fixture
def anvil() -> Iterator[Anvil]:
    """A fresh anvil per test (anvil slows as chain state grows)."""
    with Anvil() as node:
        yield node
