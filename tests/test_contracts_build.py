"""The committed contract artifacts must be exactly what `contracts/compile.mjs` produces."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONTRACTS = ROOT / "contracts"
COMPILE_SCRIPT = CONTRACTS / "compile.mjs"
BUILD_DIR = ROOT / "engine" / "dev" / "contracts"  # package data
ARTIFACTS = ("TestToken.json", "X402Batcher.json")


def test_contract_build_is_reproducible(tmp_path: Path) -> None:
    node = shutil.which("node")
    if node is None:
        if os.environ.get("CI") == "true":  # CI installs node (make setup): never skip there
            pytest.fail("node is not installed: CI must rebuild the contracts")
        pytest.skip("node is not installed: cannot rebuild the contracts (make setup needs it)")
    if not (CONTRACTS / "node_modules" / "solc").is_dir():
        pytest.fail("contracts/node_modules/solc is missing: run `npm install` in contracts/")

    proc = subprocess.run(
        [node, str(COMPILE_SCRIPT), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, f"compile.mjs failed:\n{proc.stdout}\n{proc.stderr}"

    for name in ARTIFACTS:
        committed = BUILD_DIR / name
        rebuilt = tmp_path / name
        assert committed.is_file(), f"missing committed artifact {committed}"
        assert rebuilt.is_file(), f"compile.mjs did not write {name}"
        assert rebuilt.read_bytes() == committed.read_bytes(), (
            f"engine/dev/contracts/{name} is stale: rerun `node contracts/compile.mjs`, commit it"
        )
