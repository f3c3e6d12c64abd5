from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import ConfigError, EngineConfig, dump_config, load_config, signer_keys

GOOD = """
[ledger]
path = "ledger.duckdb"

[policy]
max_batch_size = 100
max_wait_ms = 250

[[chains]]
chain_id = 8453
network_names = ["base"]
rpc_url = "http://127.0.0.1:8545"
batcher = "0x00000000000000000000000000000000000000aa"
signer_key_envs = ["X402_SIGNER_KEY"]
confirmations = 2

[[chains.tokens]]
address = "0x833589fcd6edb6e08f4c7c32d4f71b54bda02913"
name = "USD Coin"
version = "2"
"""


def test_toml_loads_with_safe_defaults_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "engine.toml"
    path.write_text(GOOD)
    config = load_config(path)
    chain = config.chains[0]
    assert chain.confirmations == 2 and chain.mode == "compact"
    assert chain.gas_per_tx_max == 16_777_216 and chain.simulate
    assert config.policy.max_batch_size == 100 and config.policy.deadline_margin_s == 30
    (tmp_path / "again.toml").write_bytes(dump_config(config))
    assert load_config(tmp_path / "again.toml") == config


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('batcher = "0x00000000000000000000000000000000000000aa"', 'batcher = "0x12"'), "batcher"),
        (("confirmations = 2", "confirmations = 0"), "confirmations"),
        (("max_batch_size = 100", "max_batch_size = 0"), "max_batch_size"),
        (("chain_id = 8453", 'chain_id = "base"'), "chain_id"),
        (("confirmations = 2", "confirmatons = 2"), "confirmatons"),  # typo: unknown field
    ],
)
def test_bad_configuration_names_the_field(
    tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(GOOD.replace(*change))
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_signer_keys_come_from_the_environment_and_never_show(tmp_path: Path) -> None:
    path = tmp_path / "engine.toml"
    path.write_text(GOOD)
    chain = load_config(path).chains[0]
    secret = "0x" + "ab" * 32
    (key,) = signer_keys(chain, {"X402_SIGNER_KEY": secret})
    assert key.secret == bytes.fromhex("ab" * 32)
    assert "ab" * 4 not in repr(key) and "X402_SIGNER_KEY" in repr(key)
    with pytest.raises(ConfigError, match="X402_SIGNER_KEY"):
        signer_keys(chain, {})
    with pytest.raises(ConfigError, match="32-byte"):
        signer_keys(chain, {"X402_SIGNER_KEY": "0x1234"})


def test_engine_config_requires_a_chain() -> None:
    from engine.config import validate

    with pytest.raises(ConfigError, match="chain"):
        validate(EngineConfig(chains=[]))


def test_field_constraints_hold_for_a_configuration_built_in_code(tmp_path: Path) -> None:
    import msgspec

    from engine.config import validate

    path = tmp_path / "engine.toml"
    path.write_text(GOOD)
    config = load_config(path)
    bad_chain = msgspec.structs.replace(config.chains[0], confirmations=0)
    with pytest.raises(ConfigError, match=r"confirmations"):
        validate(msgspec.structs.replace(config, chains=[bad_chain]))
    bad_payee = msgspec.structs.replace(
        config.service, payee_settlement={"0xnotanaddress": "deferred"}
    )
    with pytest.raises(ConfigError, match=r"payee_settlement"):
        validate(msgspec.structs.replace(config, service=bad_payee))
    with pytest.raises(ConfigError, match=r"chains"):
        validate(msgspec.structs.replace(config, chains=[]))
