from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator

import psycopg
import pytest

from engine.chain import crypto
from engine.config import ChainConfig, EngineConfig, LedgerConfig, TokenConfig
from engine.dev.devchain import Anvil
from engine.dev.loadgen import TokenDomain
from engine.dev.postgres import PostgresServer, PostgresUnavailable
from engine.store.postgres import migrate

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


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the session (started on first use); tests get a database
    each (``pg_dsn``). Missing server binaries skip the tests, except in CI, where they fail."""
    try:
        server = PostgresServer()
    except PostgresUnavailable as exc:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(str(exc))
    with server:
        yield server


_databases = itertools.count(1)


@pytest.fixture
def pg_dsn(postgres: PostgresServer) -> str:
    """A fresh database on the session's server, migrated to the current schema."""
    name = f"t{next(_databases)}_{os.getpid()}"
    with psycopg.connect(postgres.dsn, autocommit=True) as con:
        con.execute(f"CREATE DATABASE {name}")
    dsn = postgres.dsn.rsplit("/", 1)[0] + "/" + name
    migrate(dsn)
    return dsn


@pytest.fixture
def anvil() -> Iterator[Anvil]:
    """A fresh anvil per test (anvil slows as chain state grows)."""
    with Anvil() as node:
        yield node
