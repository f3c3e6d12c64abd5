"""The test contracts for smart-wallet payers (issue 13, first step), on a real anvil: the
token's bytes-signature ``transferWithAuthorization`` asks a payer with code through EIP-1271
(no ECDSA fallback), a CREATE2 factory deploys counterfactual wallets, and the deployless
``SignatureChecks`` answers many signatures (EOA, EIP-1271, ERC-6492) in one ``eth_call``."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
from eth_abi.abi import decode as abi_decode
from eth_abi.abi import encode as abi_encode

from engine.chain import codec, crypto
from engine.chain.rpc import Rpc, RpcError
from engine.dev import artifacts
from engine.dev.devchain import Anvil, Deployer, setup_devchain
from engine.model import hex_addr

pytestmark = pytest.mark.chain
ERC6492_SUFFIX = bytes.fromhex("64926492" * 8)
BYTES_FORM = codec.selector(
    "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)"
)


async def _deploy(deployer: Deployer, name: str, args: bytes = b"") -> str:
    receipt = await deployer.send(None, artifacts.bytecode(name) + args)
    return str(receipt["contractAddress"]).lower()


async def test_wallet_payers_and_the_batched_signature_check(anvil: Anvil) -> None:
    dev = await setup_devchain(anvil.url, payers=1)
    rpc = Rpc(anvil.url)
    deployer = Deployer(rpc, dev.payer_key_bytes()[0], dev.chain_id)
    await rpc.call("anvil_setBalance", [deployer.address, hex(10**20)])  # gas for a payer
    owner_key = os.urandom(32)
    owner = crypto.private_key_address(owner_key)
    wallet = await _deploy(deployer, "TestWallet", abi_encode(["address"], [owner]))
    factory = await _deploy(deployer, "WalletFactory")
    token = bytes.fromhex(dev.token[2:])
    payee = bytes.fromhex(dev.payee[2:])
    mint = codec.selector("transfer(address,uint256)") + abi_encode(
        ["address", "uint256"], [bytes.fromhex(wallet[2:]), 5000]
    )
    await deployer.send(dev.token, mint)  # the first payer funds the wallet
    now = int(time.time())

    def authorization(payer: bytes, key: bytes, value: int) -> tuple[bytes, bytes, bytes]:
        nonce = os.urandom(32)
        digest = crypto.transfer_digest(
            dev.domain.separator, payer, payee, value, now - 60, now + 3600, nonce
        )
        return digest, nonce, crypto.sign_digest(key, digest)

    def transfer(payer: bytes, value: int, nonce: bytes, signature: bytes) -> bytes:
        return BYTES_FORM + abi_encode(
            ["address", "address", "uint256", "uint256", "uint256", "bytes32", "bytes"],
            [payer, payee, value, now - 60, now + 3600, nonce, signature],
        )

    raw_wallet = bytes.fromhex(wallet[2:])
    # the wallet's owner signs: EIP-1271 says yes, the token moves the wallet's tokens
    _, nonce, signature = authorization(raw_wallet, owner_key, 1000)
    receipt = await deployer.send(dev.token, transfer(raw_wallet, 1000, nonce, signature))
    logs = [
        codec.Log(**{k: v for k, v in log.items() if k in ("address", "topics", "data")})
        for log in receipt["logs"]
    ]
    moved = codec.Receipt(
        receipt["transactionHash"],
        receipt["blockNumber"],
        receipt["blockHash"],
        receipt["status"],
        receipt["gasUsed"],
        logs=logs,
    )
    assert codec.transfer_in_receipt(moved, token, raw_wallet, payee, 1000)
    # anyone else's signature for the wallet: refused, with USDC's message (no ECDSA fallback)
    _, nonce, wrong = authorization(raw_wallet, os.urandom(32), 1000)
    with pytest.raises(RpcError, match="invalid signature"):
        await rpc.estimate_gas(token, transfer(raw_wallet, 1000, nonce, wrong), deployer.address)

    # the batched check, deployless: EOA, wallet, counterfactual wallet (ERC-6492)
    eoa_key = dev.payer_key_bytes()[0]
    eoa = crypto.private_key_address(eoa_key)
    salt = os.urandom(32)
    predict = codec.selector("walletAddress(address,bytes32)") + abi_encode(
        ["address", "bytes32"], [owner, salt]
    )
    (future,) = abi_decode(["address"], await rpc.eth_call(bytes.fromhex(factory[2:]), predict))
    future_raw = bytes.fromhex(future[2:])
    assert await rpc.call("eth_getCode", [future, "latest"]) == "0x"
    create = codec.selector("createWallet(address,bytes32)") + abi_encode(
        ["address", "bytes32"], [owner, salt]
    )

    def wrapped(inner: bytes) -> bytes:
        return (
            abi_encode(["address", "bytes", "bytes"], [bytes.fromhex(factory[2:]), create, inner])
            + ERC6492_SUFFIX
        )

    h = os.urandom(32)
    items = [
        (eoa, h, crypto.sign_digest(eoa_key, h)),  # EOA, its own key
        (eoa, h, crypto.sign_digest(owner_key, h)),  # EOA, another key
        (raw_wallet, h, crypto.sign_digest(owner_key, h)),  # wallet, its owner
        (raw_wallet, h, crypto.sign_digest(eoa_key, h)),  # wallet, not its owner
        (future_raw, h, crypto.sign_digest(owner_key, h)),  # not deployed, not wrapped
        (future_raw, h, wrapped(crypto.sign_digest(eoa_key, h))),  # 6492, not the owner
        (future_raw, h, wrapped(crypto.sign_digest(owner_key, h))),  # 6492, the owner
    ]  # (within the one eth_call, a wallet deployed by an item exists for the later ones)
    data = artifacts.bytecode("SignatureChecks") + abi_encode(
        ["address[]", "bytes32[]", "bytes[]"],
        [[i[0] for i in items], [i[1] for i in items], [i[2] for i in items]],
    )
    answer = await rpc.call("eth_call", [{"data": "0x" + data.hex()}, "latest"])
    (valid,) = abi_decode(["bool[]"], bytes.fromhex(answer[2:]))
    assert list(valid) == [True, False, True, False, False, False, True]
    # the check deployed nothing: the counterfactual wallet still has no code
    assert await rpc.call("eth_getCode", [hex_addr(future_raw), "latest"]) == "0x"
    await rpc.aclose()


async def test_the_compact_batch_settles_a_wallet_payer_with_a_65_byte_signature(
    anvil: Anvil,
) -> None:
    """USDC v2.2's (v, r, s) form routes by code too: a wallet whose EIP-1271 signature is 65
    bytes (an owner's ECDSA signature, as the simplest smart accounts use) settles through the
    batcher's compact path like an EOA."""
    dev = await setup_devchain(anvil.url, payers=1)
    rpc = Rpc(anvil.url)
    deployer = Deployer(rpc, dev.payer_key_bytes()[0], dev.chain_id)
    await rpc.call("anvil_setBalance", [deployer.address, hex(10**20)])
    owner_key = os.urandom(32)
    owner = crypto.private_key_address(owner_key)
    wallet = bytes.fromhex(
        (await _deploy(deployer, "TestWallet", abi_encode(["address"], [owner])))[2:]
    )
    mint = codec.selector("transfer(address,uint256)") + abi_encode(
        ["address", "uint256"], [wallet, 5000]
    )
    await deployer.send(dev.token, mint)
    payee = bytes.fromhex(dev.payee[2:])
    token = bytes.fromhex(dev.token[2:])
    now = int(time.time())
    nonce = os.urandom(32)
    digest = crypto.transfer_digest(
        dev.domain.separator, wallet, payee, 1000, now - 60, now + 3600, nonce
    )
    from engine.model import Payment

    payment = Payment(
        chain_id=dev.chain_id,
        token=token,
        payer=wallet,
        payee=payee,
        value=1000,
        valid_after=now - 60,
        valid_before=now + 3600,
        nonce=nonce,
        signature=crypto.sign_digest(owner_key, digest),
        network="anvil",
        x402_version=2,
    )
    receipt = await deployer.send(dev.batcher, codec.settle_calldata(token, [payment]))
    topics = [log["topics"][0] for log in receipt["logs"]]
    assert "0x" + codec.AUTHORIZATION_USED.hex() in topics, receipt["logs"]
    assert "0x" + codec.ITEM_FAILED.hex() not in topics
    await rpc.aclose()


def _wallet_payment(
    dev: Any, wallet: bytes, signer_key: bytes, value: int, now: int
) -> tuple[Any, Any]:
    """An x402 payment from ``wallet`` (a smart wallet) signed by ``signer_key``."""
    import msgspec

    from engine.dev.loadgen import payment_v2

    payee = bytes.fromhex(dev.payee[2:])
    payload, req = payment_v2(dev.domain, signer_key, payee, value, now)
    auth = payload.payload.eip3009
    nonce = bytes.fromhex(auth.nonce[2:])
    digest = crypto.transfer_digest(
        dev.domain.separator,
        wallet,
        payee,
        value,
        int(auth.valid_after),
        int(auth.valid_before),
        nonce,
    )
    signature = crypto.sign_digest(signer_key, digest)
    inner = msgspec.structs.replace(
        payload.payload,
        signature="0x" + signature.hex(),
        authorization=msgspec.structs.replace(auth, from_=hex_addr(wallet)),
    )
    return msgspec.structs.replace(payload, payload=inner), req


@pytest.mark.parametrize("workers", [0, 2])
async def test_smart_wallet_payers_verify_on_chain_and_settle_in_the_batch(
    anvil: Anvil, tmp_path: Any, workers: int
) -> None:
    """EIP-1271 payers with 65-byte signatures beside EOAs: their signatures are judged on
    chain (many per call), they settle in the same compact batch, and a wallet whose
    isValidSignature says no is refused at verify, as is an ordinary account's bad signature."""
    import msgspec

    from engine.dev.devchain import engine_config
    from engine.dev.loadgen import payment_v2
    from engine.engine import Engine
    from engine.model import Accepted, Rejected
    from engine.rules import reasons

    from .chain import balances

    dev = await setup_devchain(anvil.url, payers=4)
    rpc = Rpc(anvil.url)
    deployer = Deployer(rpc, dev.payer_key_bytes()[0], dev.chain_id)
    await rpc.call("anvil_setBalance", [deployer.address, hex(10**20)])
    owners = [os.urandom(32) for _ in range(3)]
    wallets = []
    for owner_key in owners:
        args = abi_encode(["address"], [crypto.private_key_address(owner_key)])
        wallet = bytes.fromhex((await _deploy(deployer, "TestWallet", args))[2:])
        fund = codec.selector("transfer(address,uint256)") + abi_encode(
            ["address", "uint256"], [wallet, 10_000]
        )
        await deployer.send(dev.token, fund)
        wallets.append(wallet)
    config, env = engine_config(dev, str(tmp_path / "l.duckdb"))
    ingest = msgspec.structs.replace(config.ingest, verify_workers=workers)
    config = msgspec.structs.replace(config, ingest=ingest)
    now = int(time.time())
    payee = bytes.fromhex(dev.payee[2:])
    keys = dev.payer_key_bytes()
    good = [_wallet_payment(dev, w, k, 1000, now) for w, k in zip(wallets, owners, strict=True)]
    good += [payment_v2(dev.domain, keys[i], payee, 1000, now) for i in range(1, 4)]
    stranger = _wallet_payment(dev, wallets[0], os.urandom(32), 1000, now)
    account = crypto.private_key_address(keys[1])  # an ordinary account, signed by another key
    forged = _wallet_payment(dev, account, owners[0], 1000, now)
    before = (await balances(rpc, dev.token, [dev.payee]))[0]
    async with Engine.open(config, environ=env) as engine:
        _, refused = await engine.verify(*stranger)  # the wallet's isValidSignature says no
        assert refused is not None and refused.reason == reasons.SIGNATURE, refused
        _, refused = await engine.verify(*forged)  # an ordinary account's bad signature
        assert refused is not None and refused.reason == reasons.SIGNATURE, refused
        results = await engine.submit_many([*good, stranger])
        assert all(isinstance(r, Accepted) for r in results[:-1]), results
        assert isinstance(results[-1], Rejected) and results[-1].reason == reasons.SIGNATURE
        for r in results[:-1]:
            assert isinstance(r, Accepted)
            assert (await engine.wait(r.id, timeout_s=60)).state == "settled"
        assert engine.statistics().batches_mined == 1  # wallets and EOAs in one transaction
        checks = sum(s.calls for s in engine.signature_statistics().values())
        assert checks <= 4  # the three wallets of one submit_many shared a call
    assert (await balances(rpc, dev.token, [dev.payee]))[0] - before == 6 * 1000
    await rpc.aclose()


async def test_counterfactual_wallets_deploy_and_pay_in_the_batch(
    anvil: Anvil, tmp_path: Any
) -> None:
    """ERC-6492: a wallet that does not exist yet pays with a signature wrapping its factory's
    deployment call. Accepted only from an allowlisted factory; judged on chain in one call
    that deploys nothing; settled through the batcher's signed items, the factory called once
    per wallet however many of its payments share the batch, beside EOAs."""
    import msgspec

    from engine.dev.devchain import engine_config
    from engine.dev.loadgen import payment_v2
    from engine.engine import Engine
    from engine.model import Accepted, Rejected
    from engine.rules import reasons

    from .chain import balances

    dev = await setup_devchain(anvil.url, payers=3)
    rpc = Rpc(anvil.url)
    deployer = Deployer(rpc, dev.payer_key_bytes()[0], dev.chain_id)
    await rpc.call("anvil_setBalance", [deployer.address, hex(10**20)])
    factory = bytes.fromhex((await _deploy(deployer, "WalletFactory"))[2:])
    rogue = bytes.fromhex((await _deploy(deployer, "WalletFactory"))[2:])  # not allowlisted
    owner_key = os.urandom(32)
    owner = crypto.private_key_address(owner_key)
    salt = os.urandom(32)
    predict = codec.selector("walletAddress(address,bytes32)") + abi_encode(
        ["address", "bytes32"], [owner, salt]
    )
    (future,) = abi_decode(["address"], await rpc.eth_call(factory, predict))
    wallet = bytes.fromhex(future[2:])
    fund = codec.selector("transfer(address,uint256)") + abi_encode(
        ["address", "uint256"], [wallet, 10_000]
    )
    await deployer.send(dev.token, fund)  # tokens wait at the address before any code does
    create = codec.selector("createWallet(address,bytes32)") + abi_encode(
        ["address", "bytes32"], [owner, salt]
    )

    def counterfactual(via: bytes) -> tuple[Any, Any]:
        payload, req = _wallet_payment(dev, wallet, owner_key, 1000, now)
        inner = bytes.fromhex(payload.payload.signature[2:])
        wrapped = abi_encode(["address", "bytes", "bytes"], [via, create, inner])
        wrapped += ERC6492_SUFFIX
        signed = msgspec.structs.replace(payload.payload, signature="0x" + wrapped.hex())
        return msgspec.structs.replace(payload, payload=signed), req

    now = int(time.time())
    config, env = engine_config(dev, str(tmp_path / "l.duckdb"))
    chain = msgspec.structs.replace(config.chains[0], eip6492_factories=[hex_addr(factory)])
    config = msgspec.structs.replace(config, chains=[chain])
    payee = bytes.fromhex(dev.payee[2:])
    keys = dev.payer_key_bytes()
    work = [counterfactual(factory), counterfactual(factory)]  # two payments, one deployment
    work += [payment_v2(dev.domain, keys[i], payee, 1000, now) for i in (1, 2)]
    before = (await balances(rpc, dev.token, [dev.payee]))[0]
    async with Engine.open(config, environ=env) as engine:
        _, refused = await engine.verify(*counterfactual(rogue))
        assert refused is not None and refused.reason == reasons.FACTORY_NOT_ALLOWED, refused
        payment, verdict = await engine.verify(*work[0])
        assert verdict is None and payment is not None, verdict
        assert await rpc.call("eth_getCode", [future, "latest"]) == "0x"  # verify deployed none
        results = await engine.submit_many(work)
        assert all(isinstance(r, Accepted) for r in results), results
        for r in results:
            assert isinstance(r, Accepted)
            assert (await engine.wait(r.id, timeout_s=60)).state == "settled"
        stats = engine.statistics()
        assert stats.batches_mined == 1  # the new wallet and the EOAs in one transaction
        # a wrapping naming another factory stays refused, even now that the wallet exists
        # (fail closed: the allowlist is checked before the chain is asked)
        refused_again = await engine.submit(*counterfactual(rogue))
        assert isinstance(refused_again, Rejected)
        assert refused_again.reason == reasons.FACTORY_NOT_ALLOWED
    assert await rpc.call("eth_getCode", [future, "latest"]) != "0x"
    created = await rpc.call(
        "eth_getLogs",
        [{"address": hex_addr(factory), "fromBlock": "0x0", "toBlock": "latest"}],
    )
    assert len(created) == 1  # deployed once
    assert (await balances(rpc, dev.token, [dev.payee]))[0] - before == 4 * 1000
    await rpc.aclose()
