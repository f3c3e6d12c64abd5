"""Gas per payment: one transaction per payment vs aggregate3 vs the compact entry point, for
EOA payers, for smart-wallet payers (EIP-1271, and ERC-6492 counterfactual wallets whose
first payment deploys them) and for Permit2 payers (the x402 exact proxy called directly, as
the reference facilitator does, vs the batcher's settleCalls).

    python -m benchmarks.gas [--sizes 1,10,100] [--wallets 100] [--permit2 100]
        [--json bench-results/gas.json]

Each measurement runs on a fresh anvil (anvil slows as its state grows), with distinct payers
who hold balances paying one payee who already holds a balance. "max" is the largest batch whose
gas fits the EIP-7825 per-transaction cap (16,777,216), derived from the measured fixed and
per-item costs and then proven by sending it with the cap as its gas limit on an anvil that
enforces the cap (--enable-tx-gas-limit).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import msgspec
import trio
from eth_abi.abi import decode as abi_decode
from eth_abi.abi import encode as abi_encode

from engine.chain import codec, crypto, permit2
from engine.chain.rpc import Rpc
from engine.dev import artifacts
from engine.dev.devchain import (
    Anvil,
    Deployer,
    DevChain,
    approve_permit2,
    engine_config,
    mint_batch,
    setup_devchain,
)
from engine.dev.loadgen import payment_v2
from engine.model import PERMIT2_EXACT, Payment, hex_addr
from engine.stages.verify import Verifier

TX_GAS_CAP = 16_777_216
VALUE = 1000


class Row(msgspec.Struct):
    mode: str
    batch_size: int
    gas_total: int
    gas_per_payment: float
    calldata_bytes_per_payment: float
    settled: int


async def _measure(mode: str, n: int, gas_limit: int | None = None) -> Row:
    with Anvil(
        gas_limit=max(30_000_000, TX_GAS_CAP + 1), extra_args=["--enable-tx-gas-limit"]
    ) as anvil:
        dev = await setup_devchain(anvil.url, payers=n, payer_balance=10 * VALUE)
        config, _ = engine_config(dev, ":memory:")
        verifier = Verifier(config)
        payee = bytes.fromhex(dev.payee[2:])
        now = int(time.time())
        payments: list[Payment] = []
        for key in dev.payer_key_bytes():
            payload, req = payment_v2(dev.domain, key, payee, VALUE, now)
            payment, rejected = verifier.check(payload, req, now)
            assert payment is not None, rejected
            payments.append(payment)
        rpc = Rpc(anvil.url)
        sender = Deployer(rpc, bytes.fromhex(dev.signer_keys[0][2:]), dev.chain_id)
        token = bytes.fromhex(dev.token[2:])
        batcher = bytes.fromhex(dev.batcher[2:])
        receipts = []
        calldata = 0
        if mode == "single":
            for p in payments:
                data = codec.transfer_calldata(p)
                calldata += len(data)
                receipts.append(await sender.send(dev.token, data, gas=200_000))
        else:
            if mode == "compact":
                data = codec.settle_calldata(token, payments)
            else:
                data = codec.aggregate3_calldata(token, payments)
            calldata = len(data)
            limit = gas_limit or min(
                TX_GAS_CAP, await rpc.estimate_gas(batcher, data, sender.address) * 6 // 5
            )
            receipts.append(await sender.send(dev.batcher, data, gas=limit))
        used_topic = "0x" + codec.AUTHORIZATION_USED.hex()
        settled = sum(1 for r in receipts for log in r["logs"] if log["topics"][0] == used_topic)
        total = sum(int(r["gasUsed"], 16) for r in receipts)
        await rpc.aclose()
    return Row(mode, n, total, total / n, calldata / n, settled)


def _wallet_payment(dev: DevChain, wallet: bytes, owner_key: bytes, now: int) -> Payment:
    payee = bytes.fromhex(dev.payee[2:])
    nonce = os.urandom(32)
    digest = crypto.transfer_digest(
        dev.domain.separator, wallet, payee, VALUE, now - 60, now + 3600, nonce
    )
    return Payment(
        chain_id=dev.chain_id,
        token=bytes.fromhex(dev.token[2:]),
        payer=wallet,
        payee=payee,
        value=VALUE,
        valid_after=now - 60,
        valid_before=now + 3600,
        nonce=nonce,
        signature=crypto.sign_digest(owner_key, digest),
        network="anvil",
        x402_version=2,
    )


async def _measure_wallets(mode: str, n: int) -> Row:
    """Smart-wallet payers. ``wallet single`` / ``wallet compact``: deployed EIP-1271 wallets
    (65-byte owner signatures), one transaction each or one compact batch. ``6492 single`` /
    ``6492 signed``: counterfactual wallets paying for the first time: a deployment then a
    transfer each (as the reference facilitator does), or one ``settleSigned`` batch that
    deploys every wallet and transfers."""
    with Anvil(gas_limit=max(30_000_000, TX_GAS_CAP + 1)) as anvil:
        dev = await setup_devchain(anvil.url, payers=1)
        rpc = Rpc(anvil.url)
        owner = Deployer(rpc, bytes.fromhex(dev.deployer_key[2:]), dev.chain_id)
        made = await owner.send(None, artifacts.bytecode("WalletFactory"))
        factory = bytes.fromhex(str(made["contractAddress"])[2:])
        keys = [os.urandom(32) for _ in range(n)]
        salts = [os.urandom(32) for _ in range(n)]
        creates = [
            codec.selector("createWallet(address,bytes32)")
            + abi_encode(["address", "bytes32"], [crypto.private_key_address(k), salt])
            for k, salt in zip(keys, salts, strict=True)
        ]
        wallets = []
        for key, salt in zip(keys, salts, strict=True):
            ask = codec.selector("walletAddress(address,bytes32)") + abi_encode(
                ["address", "bytes32"], [crypto.private_key_address(key), salt]
            )
            (address,) = abi_decode(["address"], await rpc.eth_call(factory, ask))
            wallets.append(bytes.fromhex(address[2:]))
        if mode.startswith("wallet"):  # deployed before (not counted)
            for create in creates:
                await owner.send(hex_addr(factory), create)
        await mint_batch(owner, dev.token, [hex_addr(w) for w in wallets], 10 * VALUE)
        now = int(time.time())
        payments = [_wallet_payment(dev, w, k, now) for w, k in zip(wallets, keys, strict=True)]
        sender = Deployer(rpc, bytes.fromhex(dev.signer_keys[0][2:]), dev.chain_id)
        receipts = []
        calldata = 0
        if mode.endswith("single"):
            for create, p in zip(creates, payments, strict=True):
                if mode.startswith("6492"):
                    calldata += len(create)
                    receipts.append(await sender.send(hex_addr(factory), create, gas=1_000_000))
                data = codec.transfer_calldata(p)
                calldata += len(data)
                receipts.append(await sender.send(dev.token, data, gas=300_000))
        else:
            if mode.startswith("6492"):
                payments = [
                    msgspec.structs.replace(
                        p,
                        signature=abi_encode(
                            ["address", "bytes", "bytes"], [factory, create, p.signature]
                        )
                        + codec.ERC6492_SUFFIX,
                    )
                    for create, p in zip(creates, payments, strict=True)
                ]
            data = codec.settle_calldata(bytes.fromhex(dev.token[2:]), payments)
            calldata = len(data)
            limit = min(
                TX_GAS_CAP,
                await rpc.estimate_gas(bytes.fromhex(dev.batcher[2:]), data, sender.address)
                * 6
                // 5,
            )
            receipts.append(await sender.send(dev.batcher, data, gas=limit))
        used_topic = "0x" + codec.AUTHORIZATION_USED.hex()
        settled = sum(1 for r in receipts for log in r["logs"] if log["topics"][0] == used_topic)
        total = sum(int(r["gasUsed"], 16) for r in receipts)
        await rpc.aclose()
    return Row(mode, n, total, total / n, calldata / n, settled)


async def _measure_permit2(mode: str, n: int) -> Row:
    """Permit2 ``exact`` payers (approved once before, not counted): ``permit2 single`` calls
    the x402 exact proxy's settle once per payment; ``permit2 calls`` sends one batcher
    ``settleCalls`` with a proxy settle per payment."""
    with Anvil(gas_limit=max(30_000_000, TX_GAS_CAP + 1)) as anvil:
        dev = await setup_devchain(anvil.url, payers=n, payer_balance=10 * VALUE)
        rpc = Rpc(anvil.url)
        approvals = await approve_permit2(rpc, dev.chain_id, dev.token, dev.payer_keys)
        print(f"  (one-time approval of Permit2: {approvals / n:,.0f} gas per payer)", flush=True)
        domain = permit2.domain_separator(dev.chain_id)
        now = int(time.time())
        payments = []
        for key in dev.payer_key_bytes():
            unsigned = Payment(
                chain_id=dev.chain_id,
                token=bytes.fromhex(dev.token[2:]),
                payer=crypto.private_key_address(key),
                payee=bytes.fromhex(dev.payee[2:]),
                value=VALUE,
                valid_after=0,
                valid_before=now + 3600,
                nonce=os.urandom(32),
                signature=b"",
                network="anvil",
                x402_version=2,
                method=PERMIT2_EXACT,
                permitted=VALUE,
            )
            signature = crypto.sign_digest(key, permit2.digest(domain, unsigned))
            payments.append(msgspec.structs.replace(unsigned, signature=signature))
        sender = Deployer(rpc, bytes.fromhex(dev.signer_keys[0][2:]), dev.chain_id)
        receipts = []
        calldata = 0
        if mode == "permit2 single":
            for p in payments:
                proxy, data = permit2.settle_call(p)
                calldata += len(data)
                receipts.append(await sender.send(hex_addr(proxy), data, gas=300_000))
        else:
            data = codec.settle_calls_calldata(payments)
            calldata = len(data)
            limit = await rpc.estimate_gas(bytes.fromhex(dev.batcher[2:]), data, sender.address)
            receipts.append(
                await sender.send(dev.batcher, data, gas=min(TX_GAS_CAP, limit * 6 // 5))
            )
        # Each receipt's items: the whole batch, or its one payment.
        groups = [payments] if mode == "permit2 calls" else [[p] for p in payments]
        settled = 0
        for r, items in zip(receipts, groups, strict=True):
            outcomes = codec.item_outcomes(
                msgspec.convert(r, codec.Receipt),
                bytes.fromhex(dev.batcher[2:]),
                bytes.fromhex(dev.token[2:]),
                items,
            )
            settled += sum(o.status is codec.ItemStatus.SETTLED for o in outcomes)
        total = sum(int(r["gasUsed"], 16) for r in receipts)
        await rpc.aclose()
    return Row(mode, n, total, total / n, calldata / n, settled)


async def run_permit2(n: int) -> list[Row]:
    rows = []
    for mode, size in (("permit2 single", 10), ("permit2 calls", n)):
        rows.append(await _measure_permit2(mode, size))
        print(_fmt(rows[-1]), flush=True)
    return rows


async def run_wallets(n: int) -> list[Row]:
    rows = []
    for mode, size in (
        ("wallet single", 10),
        ("wallet compact", n),
        ("6492 single", 10),
        ("6492 signed", min(n, 40)),  # each deploys a wallet (~280k gas): 40 fit a block
    ):
        rows.append(await _measure_wallets(mode, size))
        print(_fmt(rows[-1]), flush=True)
    return rows


async def run(sizes: list[int]) -> list[Row]:
    rows: list[Row] = []
    for mode in ("single", "aggregate3", "compact"):
        for n in [10] if mode == "single" else sizes:
            rows.append(await _measure(mode, n))
            print(_fmt(rows[-1]), flush=True)
        if mode == "single":
            continue
        # Largest batch under the per-transaction cap: from the measured fixed and per-item gas.
        by_n = {r.batch_size: r.gas_total for r in rows if r.mode == mode}
        lo, hi = min(by_n), max(by_n)
        per_item = (by_n[hi] - by_n[lo]) / (hi - lo)
        fixed = by_n[lo] - lo * per_item
        n_max = int((TX_GAS_CAP - fixed) / (per_item * 1.01))  # 1% margin for the 63/64 rule
        row = await _measure(mode, n_max, gas_limit=TX_GAS_CAP)
        rows.append(row)
        print(_fmt(row) + "  (max under the cap)", flush=True)
    return rows


def _fmt(r: Row) -> str:
    return (
        f"{r.mode:>14}  N={r.batch_size:<4} gas/payment={r.gas_per_payment:>9,.0f}"
        f"  calldata/payment={r.calldata_bytes_per_payment:>6.0f} B  settled={r.settled}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="1,10,100")
    parser.add_argument(
        "--wallets", type=int, default=100, help="smart-wallet batch size (0: skip them)"
    )
    parser.add_argument(
        "--permit2", type=int, default=100, help="Permit2 batch size (0: skip them)"
    )
    parser.add_argument("--json", default="bench-results/gas.json")
    args = parser.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    rows = trio.run(run, sizes)
    if args.wallets:
        rows += trio.run(run_wallets, args.wallets)
    if args.permit2:
        rows += trio.run(run_permit2, args.permit2)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(msgspec.json.format(msgspec.json.encode(rows)))
    single = next(r for r in rows if r.mode == "single")
    print(f"\none transaction per payment: {single.gas_per_payment:,.0f} gas")
    for r in rows:
        if r.mode.endswith("single"):
            continue
        base = next(
            (b for b in rows if b.mode == r.mode.split()[0] + " single"), single
        )  # wallets against wallets paid one transaction each
        saving = 1 - r.gas_per_payment / base.gas_per_payment
        print(
            f"{r.mode:>14} N={r.batch_size:<4} {saving:6.1%} less gas per payment than {base.mode}"
        )


if __name__ == "__main__":
    main()
