"""A local development chain: anvil, the test token, the batcher, funded payers.

Used by ``x402-engine devchain``/``demo``, the tests and the benchmarks. Everything listens on
127.0.0.1 only.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import msgspec
import trio
from eth_abi.abi import encode as abi_encode
from eth_account import Account
from eth_utils.address import to_checksum_address

from ..chain import codec, crypto, permit2
from ..chain.rpc import Rpc, RpcError
from ..config import ChainConfig, EngineConfig, LedgerConfig, PolicyConfig, TokenConfig
from ..model import EXACT_PERMIT2_PROXY, PERMIT2, UPTO_PERMIT2_PROXY, hex_addr
from . import artifacts
from .loadgen import TokenDomain

ANVIL_CHAIN_ID = 31337
TOKEN_NAME = "USD Coin"
TOKEN_VERSION = "2"
ETH = 10**18


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Anvil:
    """An anvil process on 127.0.0.1. ``block_time_s=0`` mines each transaction at once."""

    def __init__(
        self,
        port: int | None = None,
        *,
        block_time_s: float = 0,
        gas_limit: int = 150_000_000,  # Base-like: blocks hold many batches
        chain_id: int = ANVIL_CHAIN_ID,
        extra_args: Sequence[str] = (),
        log_path: Path | None = None,
        detach: bool = False,
    ) -> None:
        """``detach``: anvil gets a session of its own, so it outlives this process (the
        caller then leaves it running instead of calling :meth:`stop`)."""
        self.port = port or free_port()
        self.chain_id = chain_id
        binary = artifacts.anvil_binary()
        if not binary.exists():
            found = shutil.which("anvil")
            if found is None:
                raise FileNotFoundError(
                    f"{binary} is missing: run `npm ci` in contracts/ (the Makefile does)"
                )
            binary = Path(found)
        args = [
            str(binary),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--chain-id",
            str(chain_id),
            "--gas-limit",
            str(gas_limit),
            "--accounts",
            "1",
            "--silent",
        ]
        if block_time_s:
            args += ["--block-time", str(block_time_s)]
        args += list(extra_args)
        self._log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
            args, stdout=self._log, stderr=self._log, start_new_session=detach
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self._wait_ready()

    def _wait_ready(self, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        body = {"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"anvil exited with {self.process.returncode}")
            try:
                if httpx.post(self.url, json=body, timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.stop()
        raise TimeoutError("anvil did not start")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if not isinstance(self._log, int):
            self._log.close()

    def __enter__(self) -> Anvil:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class DevChain(msgspec.Struct):
    """What ``setup_devchain`` deployed and funded."""

    rpc_url: str
    chain_id: int
    token: str
    batcher: str
    token_name: str
    token_version: str
    deployer_key: str
    signer_keys: list[str]
    payer_keys: list[str]
    payee: str
    permit2: bool = False  # Permit2 and the x402 proxies are at their canonical addresses
    upto_batcher: str = ""  # X402OperatorBatcher, the signers its operators

    @property
    def domain(self) -> TokenDomain:
        return TokenDomain(
            self.chain_id, bytes.fromhex(self.token[2:]), self.token_name, self.token_version
        )

    def payer_key_bytes(self) -> list[bytes]:
        return [bytes.fromhex(k[2:]) for k in self.payer_keys]


def new_key(seed: bytes | None = None, label: str = "", index: int = 0) -> bytes:
    """A random private key, or with ``seed`` a deterministic one (same seed, label and index:
    same key), so that benchmark deployments get the same addresses on every fresh chain."""
    counter = 0
    while True:
        if seed is None:
            key = os.urandom(32)
        else:
            key = crypto.keccak256(seed + f"/{label}/{index}/{counter}".encode())
            counter += 1
        if 0 < int.from_bytes(key, "big") < crypto.SECP256K1_N:
            return key


class Deployer:
    """Signs and sends set-up transactions from one funded key (sequential nonces)."""

    def __init__(self, rpc: Rpc, key: bytes, chain_id: int) -> None:
        self.rpc = rpc
        self.key = key
        self.address = hex_addr(crypto.private_key_address(key))
        self.chain_id = chain_id
        self.nonce: int | None = None

    async def send(self, to: str | None, data: bytes, gas: int = 10_000_000) -> dict[str, Any]:
        return await wait_receipt(self.rpc, await self.broadcast(to, data, gas))

    async def broadcast(self, to: str | None, data: bytes, gas: int = 10_000_000) -> str:
        """Sign and send without waiting for the receipt; returns the transaction hash."""
        if self.nonce is None:
            self.nonce = await self.rpc.nonce(self.address)
        tx: dict[str, Any] = {
            "type": 2,
            "chainId": self.chain_id,
            "nonce": self.nonce,
            "value": 0,
            "data": "0x" + data.hex(),
            "gas": gas,
            "maxFeePerGas": 50 * 10**9,
            "maxPriorityFeePerGas": 10**9,
        }
        if to is not None:
            tx["to"] = to_checksum_address(to)
        signed = Account.sign_transaction(tx, self.key)
        self.nonce += 1
        return await self.rpc.send_raw(bytes(signed.raw_transaction))


async def wait_receipt(rpc: Rpc, tx_hash: str, timeout_s: float = 60.0) -> dict[str, Any]:
    with trio.fail_after(timeout_s):
        while True:
            receipt = await rpc.call("eth_getTransactionReceipt", [tx_hash])
            if receipt is not None:
                if int(receipt["status"], 16) != 1:
                    raise RuntimeError(f"transaction {tx_hash} reverted")
                return dict(receipt)
            await trio.sleep(0.05)


async def deploy(deployer: Deployer, name: str, ctor_types: list[str], args: list[Any]) -> str:
    data = artifacts.bytecode(name) + (abi_encode(ctor_types, args) if ctor_types else b"")
    receipt = await deployer.send(None, data)
    return str(receipt["contractAddress"]).lower()


async def mint_batch(deployer: Deployer, token: str, holders: Sequence[str], amount: int) -> None:
    selector = codec.selector("mintBatch(address[],uint256)")
    for start in range(0, len(holders), 400):
        chunk = list(holders[start : start + 400])
        data = selector + abi_encode(["address[]", "uint256"], [chunk, amount])
        await deployer.send(token, data, gas=16_000_000)


async def set_balance(rpc: Rpc, address: str, wei: int) -> None:
    await rpc.call("anvil_setBalance", [address, hex(wei)])


async def place_permit2(rpc: Rpc, deployer: Deployer) -> None:
    """Permit2 and the x402 exact and upto proxies at their canonical addresses (the official
    clients sign for those): deploy each normally, then copy its runtime code there (the
    proxies' Permit2 address is an immutable inside that code; Permit2 computes its domain
    from its own address)."""
    placed: list[tuple[bytes, str, list[str], list[Any]]] = [(PERMIT2, "Permit2", [], [])]
    placed += [
        (address, name, ["address"], [hex_addr(PERMIT2)])
        for address, name in (
            (EXACT_PERMIT2_PROXY, "X402ExactPermit2Proxy"),
            (UPTO_PERMIT2_PROXY, "X402UptoPermit2Proxy"),
        )
    ]
    for address, name, ctor_types, args in placed:
        deployed = await deploy(deployer, name, ctor_types, args)
        code = await rpc.call("eth_getCode", [deployed, "latest"])
        await rpc.call("anvil_setCode", [hex_addr(address), code])


async def approve_permit2(rpc: Rpc, chain_id: int, token: str, payer_keys: Sequence[str]) -> int:
    """Each payer's one-time ``token.approve(Permit2, max)`` (funded with gas for it), before
    it pays with Permit2: all sent, then their receipts awaited. Returns the gas they used."""
    sent = []
    for key in payer_keys:
        payer = Deployer(rpc, bytes.fromhex(key[2:]), chain_id)
        await set_balance(rpc, payer.address, ETH // 10)
        sent.append(await payer.broadcast(token, permit2.approve_calldata(), gas=100_000))
    return sum([int((await wait_receipt(rpc, h))["gasUsed"], 16) for h in sent])


async def setup_devchain(
    rpc_url: str,
    *,
    payers: int = 100,
    payer_balance: int = 1_000 * 10**6,
    signers: int = 1,
    token_name: str = TOKEN_NAME,
    token_version: str = TOKEN_VERSION,
    seed: bytes | None = None,
    with_permit2: bool = True,
) -> DevChain:
    """Deploy the token and batcher, fund ``payers`` payer accounts and the payee. With a
    ``seed`` every key, and so every address, is the same on each fresh chain. With
    ``with_permit2``, also Permit2 and the x402 proxies (canonical addresses) and an upto
    batcher whose operators are the signers."""
    rpc = Rpc(rpc_url)
    try:
        chain_id = await rpc.chain_id()
        deployer_key = new_key(seed, "deployer")
        deployer = Deployer(rpc, deployer_key, chain_id)
        await set_balance(rpc, deployer.address, 1_000 * ETH)
        token = await deploy(
            deployer,
            "TestToken",
            ["string", "string", "string", "uint8"],
            [token_name, token_version, "USDC", 6],
        )
        batcher = await deploy(deployer, "X402Batcher", [], [])
        signer_keys = [new_key(seed, "signer", i) for i in range(signers)]
        for key in signer_keys:
            await set_balance(rpc, hex_addr(crypto.private_key_address(key)), 1_000 * ETH)
        payer_keys = [new_key(seed, "payer", i) for i in range(payers)]
        payee_key = new_key(seed, "payee")
        payee = hex_addr(crypto.private_key_address(payee_key))
        holders = [hex_addr(crypto.private_key_address(k)) for k in payer_keys]
        await mint_batch(deployer, token, holders, payer_balance)
        await mint_batch(deployer, token, [payee], 1)  # the payee already holds a balance
        upto_batcher = ""
        if with_permit2:
            await place_permit2(rpc, deployer)
            operators = [hex_addr(crypto.private_key_address(k)) for k in signer_keys]
            upto_batcher = await deploy(deployer, "X402OperatorBatcher", ["address[]"], [operators])
        return DevChain(
            rpc_url=rpc_url,
            chain_id=chain_id,
            token=token,
            batcher=batcher,
            token_name=token_name,
            token_version=token_version,
            deployer_key="0x" + deployer_key.hex(),
            signer_keys=["0x" + k.hex() for k in signer_keys],
            payer_keys=["0x" + k.hex() for k in payer_keys],
            payee=payee,
            permit2=with_permit2,
            upto_batcher=upto_batcher,
        )
    finally:
        await rpc.aclose()


def engine_config(
    dev: DevChain,
    ledger_path: str,
    *,
    mode: str = "compact",
    policy: PolicyConfig | None = None,
    **chain_overrides: Any,
) -> tuple[EngineConfig, dict[str, str]]:
    """A configuration for ``dev`` and the environment holding its signer keys."""
    env_names = [f"X402_SIGNER_KEY_{i}" for i in range(len(dev.signer_keys))]
    chain = ChainConfig(
        chain_id=dev.chain_id,
        rpc_url=dev.rpc_url,
        batcher=dev.batcher,
        tokens=[
            TokenConfig(
                address=dev.token,
                name=dev.token_name,
                version=dev.token_version,
                symbol="USDC",
                decimals=6,
            )
        ],
        signer_key_envs=env_names,
        network_names=["anvil"],
        mode=mode,  # type: ignore[arg-type]
        poll_interval_ms=50,
        block_gas_limit=150_000_000,
        rebroadcast_after_s=3.0,
        permit2=dev.permit2 and mode == "compact",
        upto_batcher=dev.upto_batcher if mode == "compact" else "",
    )
    chain = msgspec.structs.replace(chain, **chain_overrides)
    config = EngineConfig(
        chains=[chain],
        ledger=LedgerConfig(path=ledger_path),
        policy=policy or PolicyConfig(),
    )
    return config, dict(zip(env_names, dev.signer_keys, strict=True))


async def token_balance(rpc: Rpc, token: str, owner: str) -> int:
    data = codec.balance_of_calldata(bytes.fromhex(owner[2:]))
    return int.from_bytes(await rpc.eth_call(bytes.fromhex(token[2:]), data), "big")


async def authorization_used(rpc: Rpc, token: str, payer: bytes, nonce: bytes) -> bool:
    data = codec.authorization_state_calldata(payer, nonce)
    try:
        return int.from_bytes(await rpc.eth_call(bytes.fromhex(token[2:]), data), "big") != 0
    except RpcError:
        return False
