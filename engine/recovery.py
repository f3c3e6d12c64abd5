"""Recovery at start-up: the ledger's open work put back in motion.

- Replay keys (and sold marks, payment-identifiers) of every payment whose authorization is
  still valid go back into the dedup index, so a replay is recognised across restarts.
- Every recorded-but-unconfirmed batch is rebroadcast (its latest replacement) before any
  account nonce is read, so a batch written but never sent takes its own nonce, and it is
  adopted by the confirm stage, which decides it from the chain.
- Accepted payments in no open batch are queued again.

And before any of it touches a chain, the ledger is bound to that chain (:func:`bind_ledger`):
a ledger's history (settled, sold, nonces used) is true of one chain only, and a devchain
reset keeps the chain id and the deploy addresses.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

import msgspec
import trio

from .chain import codec, crypto, permit2
from .chain.rpc import ChainClient, RpcError, RpcUnavailable
from .chain.signer import SignerPool
from .clock import Clock
from .config import ChainConfig
from .model import (
    EXACT_PERMIT2_PROXY,
    PERMIT2,
    UPTO_PERMIT2_PROXY,
    ChainMismatch,
    InflightBatch,
    PendingItem,
    Recovered,
    hex_addr,
)
from .stages.dedup import DedupIndex, Identifiers
from .store.ledger import AsyncLedger

log = logging.getLogger("x402_engine.recovery")
T = TypeVar("T")

DEDUP_GRACE_S = 60  # replay keys are kept this long after their validBefore
STARTUP_PATIENCE_S = 60.0
GENESIS = "genesis"  # the binding's subject for the genesis block hash (others: batchers)


async def restore_replay_keys(
    ledger: AsyncLedger,
    dedup: DedupIndex,
    identifiers: Identifiers,
    recovered: Recovered,
    now: float,
    owners: list[int] | None = None,
) -> None:
    since = int(now) - DEDUP_GRACE_S
    live = await ledger.run(ledger.sync.live_final_payments, since, owners)
    sales = {s.payment_id: s for s in await ledger.run(ledger.sync.live_sales, since, owners)}
    restored = [*live, *((op.id, op.payment) for op in recovered.open_payments)]
    for rid, payment in restored:  # open ones even if expired: they must finish
        sale = sales.get(rid)
        dedup.restore(payment, rid, sold=sale is not None)
        if sale is not None and sale.identifier is not None:
            identifiers.bind(sale.identifier, payment.key, payment.valid_before)
            identifiers.record_sale(rid, sale.identifier, sale.mode)


async def check_permit2(chain: ChainConfig, rpc: ChainClient, signers: SignerPool) -> None:
    """With Permit2 payments enabled, Permit2 and the x402 proxies must be at their canonical
    addresses, and with ``upto`` every signer an operator of the upto batcher: refuse to start
    otherwise (payments would be accepted that cannot settle)."""
    where = f"chain {chain.chain_id}"
    if chain.permit2 or chain.upto_batcher:
        word = await rpc.eth_call(PERMIT2, permit2.nonce_bitmap_calldata(bytes(20), bytes(32)))
        if len(word) != 32:
            raise ChainMismatch(f"{where}: no Permit2 at {hex_addr(PERMIT2)}")
    proxies = [EXACT_PERMIT2_PROXY] if chain.permit2 else []
    proxies += [UPTO_PERMIT2_PROXY] if chain.upto_batcher else []
    for proxy in proxies:
        answer = await rpc.eth_call(proxy, codec.selector("PERMIT2()"))
        if answer[12:32] != PERMIT2:
            raise ChainMismatch(f"{where}: no x402 Permit2 proxy at {hex_addr(proxy)}")
    batcher = chain.upto_batcher_address
    if batcher is not None:
        for signer in signers.signers:
            data = (
                codec.selector("operators(address)") + bytes(12) + bytes.fromhex(signer.address[2:])
            )
            answer = await rpc.eth_call(batcher, data)
            if int.from_bytes(answer[:32] or b"\0", "big") != 1:
                raise ChainMismatch(
                    f"{where}: signer {signer.address} is not an operator of the upto batcher"
                    f" {chain.upto_batcher} (X402OperatorBatcher.setOperator)"
                )


class BindingVerdict(msgspec.Struct, frozen=True):
    record: dict[str, str]  # subject -> hash, not bound yet: to be recorded
    refusal: str | None  # one line: why this ledger must not run against this chain


def judge_binding(
    recorded: Mapping[str, str],
    observed: Mapping[str, str | None],
    *,
    chain_id: int,
    ledger: str,
    rpc_url: str,
) -> BindingVerdict:
    """``ledger``'s binding to chain ``chain_id`` (``recorded``: subject -> hash) against what
    the node at ``rpc_url`` serves (``observed``: :data:`GENESIS` -> genesis block hash, each
    batcher address -> keccak256 of its code, None: no code). Refused: another genesis (judged
    first), or a bound batcher whose code differs or is gone. Subjects not bound yet are to be
    recorded (a batcher without code is not: there is nothing to bind it to). Pure."""
    bound = {k.lower(): v.lower() for k, v in recorded.items()}
    seen = {k.lower(): None if v is None else v.lower() for k, v in observed.items()}
    advice = "use a new ledger path, or move this one aside"
    record: dict[str, str] = {}
    genesis = seen.get(GENESIS)
    assert genesis is not None, "the genesis hash is always observed"
    if bound.get(GENESIS, genesis) != genesis:
        return BindingVerdict(
            {},
            f"{ledger} belongs to chain {chain_id} with genesis {bound[GENESIS]};"
            f" {rpc_url} has genesis {genesis} (a reset or another chain): {advice}",
        )
    if GENESIS not in bound:
        record[GENESIS] = genesis
    for address, code_hash in sorted(seen.items()):
        if address == GENESIS:
            continue
        was = bound.get(address)
        if was is None:
            if code_hash is not None:
                record[address] = code_hash  # a batcher the operator configured since
            continue
        if code_hash is None:
            return BindingVerdict(
                {},
                f"{ledger} settled on chain {chain_id} through the batcher {address}"
                f" (code hash {was}); {rpc_url} has no code there (a reset or another"
                f" chain): {advice}",
            )
        if code_hash != was:
            return BindingVerdict(
                {},
                f"{ledger} settled on chain {chain_id} through the batcher {address}"
                f" with code hash {was}; {rpc_url} has code hash {code_hash} there (a"
                f" redeployment or another chain): {advice}",
            )
    return BindingVerdict(record, None)


async def observe_chain(chain: ChainConfig, rpc: ChainClient) -> dict[str, str | None]:
    """What identifies the chain the node serves: its genesis block hash, and the keccak256
    of the code at each batcher address the engine uses (None: no code)."""
    genesis = await patiently(functools.partial(rpc.block_hash, 0), chain)
    if genesis is None:
        raise ChainMismatch(f"{chain.rpc_url} serves no genesis block (block 0)")
    observed: dict[str, str | None] = {GENESIS: genesis.lower()}
    batchers = [chain.batcher_address, chain.upto_batcher_address]
    for address in dict.fromkeys(a for a in batchers if a is not None):
        code = await patiently(functools.partial(rpc.code, address), chain)
        observed[hex_addr(address)] = hex_addr(crypto.keccak256(code)) if code else None
    return observed


async def bind_ledger(
    chain: ChainConfig, rpc: ChainClient, ledger: AsyncLedger, ledger_name: str, at_ms: int
) -> None:
    """Bind the ledger to the chain the node serves at its first start there, and refuse
    (:class:`ChainMismatch`, one line) a node that serves another chain under the same id.
    ``ledger_name`` is the ledger as messages name it (e.g. "ledger /var/x402/ledger.duckdb").

    Ledgers from before the binding existed have none: they are bound at their next start,
    to whatever the node serves then (nothing can check the past). On a shared ledger several
    instances may bind at once: the first write of each subject wins, and every instance
    judges what was committed, so a loser with another chain refuses to start."""
    observed = await observe_chain(chain, rpc)
    recorded = await ledger.run(ledger.sync.chain_binding, chain.chain_id)
    judge = functools.partial(
        judge_binding, chain_id=chain.chain_id, ledger=ledger_name, rpc_url=chain.rpc_url
    )
    verdict = judge(recorded, observed)
    if verdict.refusal is None and verdict.record:
        recorded = await ledger.run(ledger.sync.bind_chain, chain.chain_id, verdict.record, at_ms)
        verdict = judge(recorded, observed)
        if verdict.refusal is None:
            log.info(
                "chain %d: ledger bound to genesis %s and the code of %d batcher(s)",
                chain.chain_id,
                recorded.get(GENESIS),
                len(recorded) - 1,
            )
    if verdict.refusal is not None:
        raise ChainMismatch(verdict.refusal)


async def adopt_sent_batches(
    chain: ChainConfig,
    rpc: ChainClient,
    signers: SignerPool,
    recovered: Recovered,
    clock: Clock,
    ledger: AsyncLedger,
    ledger_name: str,
) -> list[InflightBatch]:
    """Check the node is the configured chain (its id, then the ledger's binding to it),
    rebroadcast this chain's open batches, then read each signer's account nonce; returns the
    batches for the confirm stage."""
    actual = await patiently(rpc.chain_id, chain)
    if actual != chain.chain_id:
        raise ChainMismatch(f"{chain.rpc_url} is chain {actual}, configured {chain.chain_id}")
    await bind_ledger(chain, rpc, ledger, ledger_name, int(clock.now() * 1000))
    await check_permit2(chain, rpc, signers)
    adopted = await rebroadcast_open_batches(chain, rpc, recovered, clock)
    for signer in signers.signers:
        signer.next_nonce = await patiently(
            functools.partial(rpc.nonce, signer.address, "pending"), chain
        )
    return adopted


async def rebroadcast_open_batches(
    chain: ChainConfig, rpc: ChainClient, recovered: Recovered, clock: Clock
) -> list[InflightBatch]:
    """This chain's recorded-but-unconfirmed batches, each rebroadcast (its latest
    replacement), as in-flight batches for the confirm stage to decide from the chain."""
    open_by_id = {op.id: op for op in recovered.open_payments}
    batches = [b for b in recovered.open_batches if b.chain_id == chain.chain_id]
    adopted: list[InflightBatch] = []
    for record in sorted(batches, key=lambda b: (b.signer, b.account_nonce)):
        replacements = recovered.replacements.get(record.id, [])
        latest = replacements[-1][1] if replacements else record.raw_tx
        # "already known", or its nonce is spent, or the node is away: the confirm stage
        # decides (it rebroadcasts what is not mined).
        with contextlib.suppress(RpcError, RpcUnavailable):
            await rpc.send_raw(latest)
        items = []
        for pid in record.payment_ids:
            op = open_by_id.pop(pid, None)
            if op is not None:
                items.append(PendingItem(pid, op.payment, op.accepted_at_ms / 1000))
        if not items:
            continue
        token = items[0].payment.token
        targets = {
            "direct": token,
            "compact": chain.batcher_address,
            "upto": chain.upto_batcher_address or chain.batcher_address,
        }
        target = targets.get(record.mode, chain.aggregate3_target)
        adopted.append(InflightBatch(record, items, token, target, clock.now(), list(replacements)))
    return adopted


def unbatched(recovered: Recovered, watched: set[int]) -> dict[int, list[PendingItem]]:
    """Open payments in no watched batch, per chain, to be queued again."""
    per_chain: dict[int, list[PendingItem]] = {}
    for op in recovered.open_payments:
        if op.id not in watched:
            item = PendingItem(op.id, op.payment, op.accepted_at_ms / 1000)
            per_chain.setdefault(op.payment.chain_id, []).append(item)
    return per_chain


async def patiently(read: Callable[[], Awaitable[T]], chain: ChainConfig) -> T:
    """A start-up read that waits for a node that is away (a restart often races the node's
    own), up to STARTUP_PATIENCE_S, then gives up with the node's error."""
    waited = 0.0
    while True:
        try:
            return await read()
        except RpcUnavailable as exc:
            if waited >= STARTUP_PATIENCE_S:
                raise
            log.warning("chain %d: node not answering yet (%s); retrying", chain.chain_id, exc)
        await trio.sleep(1.0)
        waited += 1.0
