"""Fault campaigns: the real engine against a seeded :class:`FakeChain`, seed after seed.

For each seed: a random configuration (compact or aggregate3, simulation on or off, 1-3
confirmations, 1-4 batches in flight, batch sizes), random payments (some from payers without
the funds, some expiring soon), random faults (RPC errors, a send that lands but answers an
error, lost sends, stale receipts, mempool drops, base-fee rises, reorganisations, third parties
front-running, using rival authorizations, cancelling, draining) and random crashes (the engine
is stopped at a random point and opened again on its ledger). Then the chain heals and the
engine drains. The invariants checked after every seed:

- every acknowledged payment ends final exactly once (one ``settled`` or ``failed`` event);
- the ledger agrees with the chain: ``settled`` under the very transaction whose
  ``Transfer(payer, payee, value)`` the chain holds, ``failed`` only if the chain holds no such
  transfer; the payees received exactly the settled value;
- nothing leaks or stalls: the drain ends in bounded (simulated) time with no batch in flight,
  every in-flight slot free and every queue empty.

Time is trio's ``MockClock`` (it jumps whenever every task waits) and ledger I/O runs inline,
so a seed replays the same way: a failing seed prints itself and ``x402-engine campaign --seed
N`` runs it again.
"""

from __future__ import annotations

import functools
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import trio
import trio.testing

from ..chain import codec, crypto
from ..clock import TrioWallClock
from ..config import (
    ChainConfig,
    EngineConfig,
    LedgerConfig,
    PolicyConfig,
    TokenConfig,
)
from ..dev.loadgen import TokenDomain, payment_v2
from ..engine import Engine
from ..model import Accepted, Payment, PaymentPayloadV2, RequirementsV2
from ..stages.verify import Verifier
from .fakechain import FakeChain, Faults

CHAIN_ID = 31337
TOKEN = bytes.fromhex("a0b86991c6218b36c1d19d4a2e9eb0ce3606eb48")
BATCHER = bytes.fromhex("0000000000000000000000000000000000ba7c11")
START_UNIX = 1_900_000_000
DRAIN_S = 1_800.0  # simulated seconds the healed engine gets to finish everything


class SeedReport(msgspec.Struct):
    seed: int
    payments: int
    accepted: int
    settled: int
    failed: int
    lives: int
    reorgs: int
    third_party: int
    replacements: int
    problems: list[str]
    events_digest: str  # keccak of the ledger's final event log: equal on a replay
    wall_s: float

    @property
    def ok(self) -> bool:
        return not self.problems


def _key(seed: int, label: str, index: int) -> bytes:
    return crypto.keccak256(f"x402-sim {seed} {label} {index}".encode())


def _faults(rng: random.Random) -> Faults:
    return Faults(
        rpc_error=rng.choice([0.0, 0.02, 0.05]),
        send_lands_then_errors=rng.choice([0.0, 0.1, 0.3]),
        send_lost=rng.choice([0.0, 0.05]),
        stale_receipt=rng.choice([0.0, 0.1]),
        mempool_drop=rng.choice([0.0, 0.02]),
        base_fee_spike=rng.choice([0.0, 0.03, 0.08]),
        reorg=rng.choice([0.0, 0.05, 0.1]),
        reorg_depth_max=2,
        third_party=rng.choice([0.0, 0.05, 0.15]),
    )


def _chain_config(rng: random.Random, signer_envs: list[str], confirmations: int) -> ChainConfig:
    """The seed's draw of the operator's choices for the chain."""
    return ChainConfig(
        chain_id=CHAIN_ID,
        rpc_url="sim://fake-chain",
        batcher="0x" + BATCHER.hex(),
        tokens=[TokenConfig(address="0x" + TOKEN.hex(), name="USD Coin", version="2")],
        signer_key_envs=signer_envs,
        network_names=["sim"],
        mode=rng.choice(["compact", "aggregate3"]),
        simulate=rng.random() < 0.7,
        confirmations=confirmations,
        max_inflight_batches=rng.choice([1, 2, 4]),
        poll_interval_ms=200,
        rebroadcast_after_s=3.0,
        max_fee_per_gas_wei=10**12,
        priority_fee_wei=10**6,
        block_gas_limit=150_000_000,
    )


def _workload(
    rng: random.Random,
    seed: int,
    chain: FakeChain,
    config: EngineConfig,
    payments_max: int,
) -> tuple[list[tuple[PaymentPayloadV2, RequirementsV2, Payment]], list[bytes]]:
    """Funded (or not) payers and their signed payments, registered with the chain so that it
    can tell the engine's transfers from third parties'; and the payees."""
    domain = TokenDomain(CHAIN_ID, TOKEN, "USD Coin", "2")
    payees = [_key(seed, "payee", i)[:20] for i in range(2)]
    payer_keys = [_key(seed, "payer", i) for i in range(rng.randint(3, 12))]
    for key in payer_keys:
        if rng.random() < 0.85:  # some payers hold nothing
            chain.fund(crypto.private_key_address(key), 50_000)
    verifier = Verifier(config)
    work: list[tuple[PaymentPayloadV2, RequirementsV2, Payment]] = []
    for _ in range(rng.randint(payments_max // 2, payments_max)):
        payload, req = payment_v2(
            domain,
            rng.choice(payer_keys),
            rng.choice(payees),
            rng.randint(1, 5_000),
            START_UNIX,
            valid_for_s=rng.choice([120, 3_600, 3_600]),
            nonce=rng.randbytes(32),
        )
        payment, _ = verifier.check(payload, req, START_UNIX)
        assert payment is not None
        chain.register(payment)
        work.append((payload, req, payment))
    return work, payees


# Longer than our ~60-line rule on purpose: one seed's story (draw the faults, run the engine's
# lives with crashes between them, heal, check) reads best in one place; its parts are above.
async def run_seed(seed: int, workdir: Path, *, payments_max: int = 40) -> SeedReport:
    """One seed, start to finish (call under ``trio.run`` with a ``MockClock``)."""
    started = time.perf_counter()
    rng = random.Random(seed)
    clock = TrioWallClock(START_UNIX)
    confirmations = rng.choice([1, 2, 3])
    faults = _faults(rng)
    # Reorganisations stay shallower than the confirmations the operator chose for the chain
    # (a deeper one undoes what the engine was told is final: choosing confirmations is that).
    faults = msgspec.structs.replace(
        faults,
        reorg=faults.reorg if confirmations > 1 else 0.0,
        reorg_depth_max=max(1, confirmations - 1),
    )
    chain = FakeChain(seed, clock, chain_id=CHAIN_ID, token=TOKEN, batcher=BATCHER, faults=faults)
    signer_count = rng.choice([1, 2])
    env = {f"SIM_SIGNER_{i}": "0x" + _key(seed, "signer", i).hex() for i in range(signer_count)}
    config = EngineConfig(
        chains=[_chain_config(rng, list(env), confirmations)],
        ledger=LedgerConfig(path=str(workdir / f"seed-{seed}.duckdb")),
        policy=PolicyConfig(
            max_batch_size=rng.choice([3, 8, 25]), max_wait_ms=rng.choice([100, 500])
        ),
    )
    work, payees = _workload(rng, seed, chain, config, payments_max)
    payee_start = {p: chain.balance(p) for p in payees}
    lives = rng.randint(1, 3)
    chunks = [work[i::lives] for i in range(lives)]
    accepted: dict[int, Payment] = {}
    problems: list[str] = []
    digest = ""
    report: dict[str, int] = {"replacements": 0}

    def client(_chain: ChainConfig) -> FakeChain:
        return chain

    async with trio.open_nursery() as outer:
        outer.start_soon(chain.run)
        for life in range(lives):
            last = life == lives - 1
            with trio.CancelScope() as scope:
                async with Engine.open(
                    config, clock=clock, environ=env, chain_client=client, io_threads=False
                ) as engine:
                    for payload, req, payment in chunks[life]:
                        await trio.sleep(rng.expovariate(10.0))
                        result = await engine.submit(payload, req)
                        if isinstance(result, Accepted):
                            accepted[result.id] = payment
                    if not last:
                        await trio.sleep(rng.uniform(0.0, 10.0))
                        scope.cancel()  # a crash at a random point
                        continue
                    await trio.sleep(rng.uniform(0.0, 20.0))
                    chain.faults = Faults.none()  # heal, then everything must finish
                    try:
                        await engine.drain(timeout_s=DRAIN_S)
                    except trio.TooSlowError:
                        problems.append(
                            f"stall: {engine.statistics().pending} payments not final"
                            f" {DRAIN_S:g} s after healing"
                        )
                    report["replacements"] = sum(
                        c.replacements for c in engine.settlement_statistics().values()
                    )
                    problems += await _check(engine, chain, accepted, payees, payee_start)
                    rows = await engine.query(
                        "SELECT payment_id, state, tx_hash, reason FROM payment_events ORDER BY seq"
                    )
                    digest = crypto.keccak256(repr(rows).encode()).hex()
        outer.cancel_scope.cancel()
    settled = sum(1 for p in accepted.values() if _paid(chain, p) is not None)
    return SeedReport(
        seed=seed,
        payments=len(work),
        accepted=len(accepted),
        settled=settled,
        failed=len(accepted) - settled,
        lives=lives,
        reorgs=chain.reorgs,
        third_party=len(chain.third_party_actions),
        replacements=report["replacements"],
        problems=problems,
        events_digest=digest,
        wall_s=time.perf_counter() - started,
    )


def _paid(chain: FakeChain, p: Payment) -> str | None:
    """The hash of the canonical transaction that moved exactly ``p``, if one did."""
    receipt = chain.used_by(p.payer, p.nonce)
    if receipt is None:
        return None
    if codec.transfer_in_receipt(receipt, TOKEN, p.payer, p.payee, p.value):
        return receipt.transaction_hash
    return None


async def _check(
    engine: Engine,
    chain: FakeChain,
    accepted: dict[int, Payment],
    payees: list[bytes],
    payee_start: dict[bytes, int],
) -> list[str]:
    problems: list[str] = []
    rows = await engine.query(
        "SELECT payment_id, state, tx_hash FROM payment_events"
        " WHERE state IN ('settled', 'failed') ORDER BY seq"
    )
    finals: dict[int, list[tuple[str, str | None]]] = {}
    for rid, state, tx_hash in rows:
        finals.setdefault(int(rid), []).append((str(state), tx_hash))
    settled_value = dict.fromkeys(payees, 0)
    for rid, payment in sorted(accepted.items()):
        events = finals.get(rid, [])
        if len(events) != 1:
            problems.append(f"payment {rid}: {len(events)} final events {events}")
            continue
        state, tx_hash = events[0]
        paid_in = _paid(chain, payment)
        if state == "settled":
            settled_value[payment.payee] += payment.value
            if paid_in is None:
                problems.append(f"payment {rid}: settled in {tx_hash}, the chain holds no transfer")
            elif paid_in != tx_hash:
                problems.append(
                    f"payment {rid}: settled in {tx_hash}, the chain paid it in {paid_in}"
                )
        elif paid_in is not None:
            problems.append(f"payment {rid}: failed, but the chain paid it in {paid_in}")
    for payee in payees:
        received = chain.balance(payee) - payee_start[payee]
        if received != settled_value[payee]:
            problems.append(
                f"payee 0x{payee.hex()}: received {received}, ledger settled {settled_value[payee]}"
            )
    stats = engine.statistics()
    if stats.pending:
        problems.append(f"{stats.pending} payments still pending")
    for cid, n in engine.inflight_batches().items():
        if n:
            problems.append(f"chain {cid}: {n} batches still in flight")
    for cid, st in engine.settlement_statistics().items():
        if st.free_slots != st.slots:
            problems.append(f"chain {cid}: {st.slots - st.free_slots} in-flight slots leaked")
    for cid, n in engine.queue_depths().items():
        if n:
            problems.append(f"chain {cid}: {n} payments still queued")
    return problems


def run(
    seeds: list[int],
    *,
    payments_max: int = 40,
    on_report: Callable[[SeedReport], None] | None = None,
) -> list[SeedReport]:
    """Run ``seeds`` one after another, each in its own trio run on a ``MockClock``."""
    reports: list[SeedReport] = []
    with tempfile.TemporaryDirectory(prefix="x402-campaign-") as tmp:
        for seed in seeds:
            _seed_scheduler(seed)
            report = trio.run(
                functools.partial(run_seed, seed, Path(tmp), payments_max=payments_max),
                clock=trio.testing.MockClock(autojump_threshold=0),
            )
            reports.append(report)
            if on_report is not None:
                on_report(report)
    return reports


def _seed_scheduler(seed: int) -> None:
    """trio breaks ties in its run queue with a module-level Random; seeding it makes a seed's
    task interleaving repeat (with a MockClock and no threads)."""
    from trio._core import _run

    generator = getattr(_run, "_r", None)
    if isinstance(generator, random.Random):
        generator.seed(seed)
