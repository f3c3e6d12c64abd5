"""Compiled contract artifacts (ABI and bytecode), shipped in the package
(``engine/dev/contracts/``, written by ``node contracts/compile.mjs``), so an installed wheel
can deploy them outside the checkout. anvil comes from ``$X402_ANVIL``, the checkout's
``contracts/node_modules``, or the ``PATH``."""

from __future__ import annotations

import os
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import msgspec


class Artifact(msgspec.Struct, frozen=True):
    contractName: str
    abi: list[dict[str, Any]]
    bytecode: str
    deployedBytecode: str


def contracts_dir() -> Path:
    override = os.environ.get("X402_CONTRACTS_DIR")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "contracts"


@cache
def load(name: str) -> Artifact:
    path = resources.files("engine.dev") / "contracts" / f"{name}.json"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} is missing: run `node contracts/compile.mjs` (see contracts/README.md)"
        ) from None
    return msgspec.json.decode(raw, type=Artifact)


def bytecode(name: str) -> bytes:
    return bytes.fromhex(load(name).bytecode.removeprefix("0x"))


def anvil_binary() -> Path:
    override = os.environ.get("X402_ANVIL")
    if override:
        return Path(override)
    return contracts_dir() / "node_modules" / ".bin" / "anvil"
