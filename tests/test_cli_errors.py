"""An operator's mistake gets one line saying what is wrong and what to do, exit code 2 (usage)
or 1, never a Python traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from engine.cli import build_parser, main
from engine.config import EngineConfig, LedgerConfig, dump_config


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


@pytest.fixture
def config_file(tmp_path: Path, offline_config: EngineConfig) -> Path:
    config = msgspec.structs.replace(
        offline_config, ledger=LedgerConfig(path=str(tmp_path / "ledger.duckdb"))
    )
    path = tmp_path / "engine.toml"
    path.write_bytes(dump_config(config))
    return path


def test_a_missing_configuration_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    for command in ("serve", "sweep"):
        assert main([command, "--config", str(tmp_path / "nothere.toml")]) == 2
        err = _one_line(capsys)
        assert f"x402-engine {command}: no configuration file" in err, err
        assert "devchain/engine.toml" in err  # where one comes from


def test_a_file_that_is_not_toml(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "engine.toml"
    path.write_text("[ledger\npath = 'x'\n")
    assert main(["serve", "--config", str(path)]) == 2
    assert "is not valid TOML" in _one_line(capsys)


def test_an_unknown_configuration_key(
    capsys: pytest.CaptureFixture[str], config_file: Path
) -> None:
    config_file.write_text(config_file.read_text().replace("[ledger]", "[ledger]\nbogus = 1"))
    assert main(["serve", "--config", str(config_file)]) == 2
    err = _one_line(capsys)
    assert "unknown field `bogus`" in err and "$.ledger" in err, err


def test_sweep_without_the_signer_keys_says_to_pass_the_env_file(
    capsys: pytest.CaptureFixture[str], config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("X402_TEST_KEY", raising=False)
    assert main(["sweep", "--config", str(config_file)]) == 2
    err = _one_line(capsys)
    assert "X402_TEST_KEY (signer key) is not set: pass --env-file" in err, err


def test_a_missing_env_file(capsys: pytest.CaptureFixture[str], config_file: Path) -> None:
    assert main(["sweep", "--config", str(config_file), "--env-file", "nothere.env"]) == 2
    assert "cannot read the --env-file nothere.env" in _one_line(capsys)


def test_devchain_on_a_taken_port_and_a_stop_with_nothing_running(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["devchain", "--port", str(port), "--out", str(tmp_path)]) == 2
        assert f"127.0.0.1:{port} is taken" in _one_line(capsys)
    assert main(["devchain", "--stop", "--out", str(tmp_path)]) == 2
    assert "no detached devchain" in _one_line(capsys)
    (tmp_path / "anvil.pid").write_text("garbage\n")
    assert main(["devchain", "--stop", "--out", str(tmp_path)]) == 2
    assert "holds no process id" in _one_line(capsys)


def test_a_report_on_a_missing_ledger(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["report", "--ledger", str(tmp_path / "none.duckdb")])
    assert stop.value.code == f"no ledger at {tmp_path / 'none.duckdb'}"


def test_the_help_says_what_this_is_and_where_to_start() -> None:
    text = build_parser().format_help()
    assert "batch settlement engine" in text and "x402-engine pay" in text, text
    assert "the command line." not in text
    devchain_help = subprocess.run(
        [sys.executable, "-m", "engine.cli", "devchain", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "anvil's port (default 8545)" in devchain_help
    assert "funded payers (default 100)" in devchain_help
