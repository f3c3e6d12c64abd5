"""The README's first-hour walkthrough, run as pasted: the lines are read from the README (the
```sh block after ``<!-- walkthrough -->``), not retyped here, and run by bash in a fresh
directory beside the checkout's virtual environment."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from engine.cli import main

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.chain


def walkthrough_lines() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- walkthrough -->\n```sh\n(.*?)```", readme, re.S)
    assert found, "README.md has no walkthrough block"
    return found.group(1).strip().splitlines()


def _taken(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_the_readme_walkthrough_works_as_pasted(tmp_path: Path) -> None:
    lines = walkthrough_lines()
    assert lines[0] == ". .venv/bin/activate" and any(" pay " in line for line in lines)
    for port in (8545, 4021):  # the walkthrough's own ports: the defaults a newcomer gets
        assert not _taken(port), f"127.0.0.1:{port} is in use; the walkthrough needs it"
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    script = "set -e\n" + "\n".join(lines) + "\n"
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env["COLUMNS"] = "80"
    shell = subprocess.Popen(
        ["bash", "-c", script],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = shell.communicate(timeout=300)
    finally:
        if shell.poll() is None:
            os.killpg(shell.pid, signal.SIGKILL)
            shell.wait()
        if (tmp_path / "devchain" / "anvil.pid").exists():  # the script stopped half-way
            main(["devchain", "--stop", "--out", str(tmp_path / "devchain")])
    assert shell.returncode == 0, f"stdout:\n{out}\nstderr:\n{err}"
    print(out)  # the figures the README quotes come from a run of this test (pytest -s)
    assert "Traceback" not in err, err

    assert "answer      settled" in out, out
    assert "look it up  curl -s http://127.0.0.1:4021/settlements/1" in out, out
    curl_said = next(line for line in out.splitlines() if line.startswith("{"))
    record, _ = json.JSONDecoder().raw_decode(curl_said)  # curl adds no newline after it
    assert record["id"] == 1 and record["state"] == "settled", record
    assert [event["state"] for event in record["history"]] == ["submitted", "settled"]
    assert "settled     500 with a transaction" in out, out
    assert "on chain    500 of 500 in" in out, out
    batched = re.search(r"on chain    500 of 500 in (\d+) transactions", out)
    assert batched and int(batched.group(1)) < 100, out  # batched, not one per payment
    assert "payments 501" in out, out  # report: both pay runs, all settled
    assert not (tmp_path / "devchain" / "anvil.pid").exists()  # devchain --stop ran
    assert not _taken(8545) and not _taken(4021)


def test_a_new_devchain_sets_the_previous_ledger_aside(tmp_path: Path) -> None:
    """A ledger is bound to its chain, so a new devchain moves the old one's ledger (journal
    included) to old/ rather than leave it for the engine to refuse; nothing is deleted."""
    from engine.dev.devchain import free_port

    out = tmp_path / "devchain"
    out.mkdir()
    (out / "ledger.duckdb").write_bytes(b"the old chain's ledger")
    (out / "ledger.duckdb.journal").mkdir()
    (out / "ledger.duckdb.journal" / "segment").write_bytes(b"frames")
    assert main(["devchain", "--port", str(free_port()), "--out", str(out), "--exit"]) == 0
    (aside,) = (out / "old").iterdir()
    assert (aside / "ledger.duckdb").read_bytes() == b"the old chain's ledger"
    assert (aside / "ledger.duckdb.journal" / "segment").read_bytes() == b"frames"
    assert not (out / "ledger.duckdb").exists()
    assert (out / "engine.toml").exists() and (out / "devchain.json").exists()
    assert (out / "signer.env").stat().st_mode & 0o777 == 0o600  # keys: ours only
    assert not list(out.glob("*.partial"))
