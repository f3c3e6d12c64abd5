"""The engine: wires the stages together and offers the embedding API.

    ingest (verify, dedup) ──► intake (group commit) ──► batch ──► submit ──► confirm
                                   │ DuckDB ledger ◄──────────────────┴──────────┘

``submit`` returns once the payment is durable. Everything else happens in trio tasks joined by
bounded memory channels, one batch/submit/confirm chain of stages per configured chain.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import trio
import trio.lowlevel

from . import cluster, recovery
from .chain.rpc import ChainClient, Rpc, RpcUnavailable
from .chain.signer import Signer, SignerPool
from .clock import Clock, TrioWallClock
from .config import ChainConfig, EngineConfig, SettlementMode, signer_keys, validate
from .model import (
    Accepted,
    EngineError,
    Outcome,
    Payment,
    Recovered,
    Rejected,
    SettleAnswer,
    hex_addr,
)
from .outcomes import Recorder, Statistics, Tracker
from .rules.health import Health, judge_health
from .rules.policy import BatchPolicy, schedule_policy
from .service.metrics import Histogram
from .stages.chainstate import ReaderStatistics
from .stages.dedup import DedupIndex, Identifiers
from .stages.ingest import Ingest
from .stages.intake import IntakeStage
from .stages.pipeline import ChainPipeline, SettlementStatistics
from .stages.sales import SalesDesk, SaleStatistics, SaleWriter
from .stages.signatures import SignatureStatistics
from .stages.submit import BatchIds
from .stages.verify import PAYMENT_IDENTIFIER
from .stages.verify_pool import VerifyPool
from .store.ledger import AsyncLedger
from .store.postgres import PgLedger

log = logging.getLogger("x402_engine.engine")
T = TypeVar("T")

DEDUP_GRACE_S = recovery.DEDUP_GRACE_S
ID_BLOCK = 10_000  # payment ids reserved per ledger write
DEDUP_SWEEP_S = 60.0
FOREIGN_POLL_S = 0.25  # how often a wait on another instance's payment reads the ledger


class Engine:
    """The batching settlement engine. Open it with :meth:`Engine.open`."""

    def __init__(self, config: EngineConfig, clock: Clock, ledger: AsyncLedger) -> None:
        self.config = config
        self.clock = clock
        self._ledger = ledger
        self._dedup = DedupIndex()
        self._identifiers = Identifiers()
        self._sales = SaleWriter(ledger, clock)
        self._tracker = Tracker(clock)
        self._recorder = Recorder(ledger, self._tracker, clock)
        self._chains: dict[int, ChainPipeline] = {}
        self._membership: cluster.Membership | None = None  # shared ledger only
        # shared ledger: configured accounts another instance leases (taken over if it dies)
        self._spare_signers: dict[int, list[Signer]] = {}
        self._ingest = Ingest(
            config, clock, ledger, self._tracker, self._dedup, self._identifiers, self._chains
        )
        self._tracker.on_final.append(self._ingest.release_credit)
        self._desk = SalesDesk(
            config,
            self._ingest,
            self._dedup,
            self._identifiers,
            self._sales,
            self.status,
            self.wait,
        )
        self._policy_factory: Callable[[ChainConfig], BatchPolicy] = lambda _chain: schedule_policy(
            config.policy, config.policy.max_wait_ms / 1000
        )

    # -- lifecycle --------------------------------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        config: EngineConfig,
        *,
        clock: TrioWallClock | None = None,
        environ: Mapping[str, str] | None = None,
        policy: Callable[[ChainConfig], BatchPolicy] | None = None,
        chain_client: Callable[[ChainConfig], ChainClient] | None = None,
        io_threads: bool = True,
    ) -> AsyncIterator[Engine]:
        """Start the engine: recover from the ledger, then run until the block exits.

        ``clock`` puts the engine's "now" where a test wants it (default: wall time); it
        follows trio's clock, the one injection point for time and sleeping (run under
        ``trio.testing.MockClock`` to drive both). ``environ`` replaces ``os.environ`` for
        signer keys. ``policy`` builds each chain's default batching policy (default: the one
        ``[policy]`` describes; payees in ``[[policy.payees]]`` keep their own).
        ``chain_client`` makes each chain's client (default: JSON-RPC to ``rpc_url``; the
        seeded simulator passes its fake chain). ``io_threads=False`` runs ledger I/O inline
        on the trio thread (deterministic simulation only: it blocks the engine on writes).
        """
        validate(config)
        open_ledger = functools.partial(cluster.open_backend, config, environ)
        ledger_sync = await trio.to_thread.run_sync(open_ledger) if io_threads else open_ledger()
        ledger = AsyncLedger(ledger_sync, flush_rows=config.ledger.flush_rows, threads=io_threads)
        engine = cls(config, clock or TrioWallClock(), ledger)
        if policy is not None:
            engine._policy_factory = policy
        rpcs: list[ChainClient] = []
        try:
            async with engine._run(rpcs, environ, chain_client) as running:
                yield running
        except BaseExceptionGroup as group:
            # The stages run in a nursery, so errors arrive grouped; a single error (the usual
            # case: the caller's own exception, or one stage's) is re-raised as itself.
            if len(group.exceptions) == 1 and not isinstance(
                group.exceptions[0], BaseExceptionGroup
            ):
                raise group.exceptions[0] from None
            raise
        finally:
            with trio.CancelScope(shield=True):
                for rpc in rpcs:
                    await rpc.aclose()
                await ledger.run(ledger_sync.close)

    @asynccontextmanager
    async def _run(
        self,
        rpcs: list[ChainClient],
        environ: Mapping[str, str] | None,
        chain_client: Callable[[ChainConfig], ChainClient] | None,
    ) -> AsyncIterator[Engine]:
        """The pipeline, and on a shared ledger the instance's membership (heartbeats from the
        first moment: recovering a large backlog must not look like death)."""
        shared = self._shared()
        async with trio.open_nursery() as life:
            if shared is not None:
                self._membership = cluster.Membership(
                    self._ledger, shared, self._adopt_instances, self.settle_now
                )
                life.start_soon(self._membership.run)
            try:
                async with self._pipeline(rpcs, environ, chain_client) as running:
                    if self._membership is not None:
                        self._membership.ready.set()
                    yield running
            finally:
                life.cancel_scope.cancel()

    @asynccontextmanager
    async def _pipeline(
        self,
        rpcs: list[ChainClient],
        environ: Mapping[str, str] | None,
        chain_client: Callable[[ChainConfig], ChainClient] | None,
    ) -> AsyncIterator[Engine]:
        owners = await self._own_past()
        recovered = await self._ledger.run(self._ledger.sync.recover, owners)
        await self._restore_dedup(recovered, owners)
        for chain in self.config.chains:
            rpc: ChainClient = (
                chain_client(chain)
                if chain_client is not None
                else Rpc(
                    chain.rpc_url,
                    timeout_s=chain.rpc_timeout_s,
                    retries_max=chain.rpc_retries_max,
                )
            )
            rpcs.append(rpc)
            await self._start_chain(chain, rpc, recovered, environ)
        self._requeue_unbatched(recovered)
        for op in recovered.open_payments:  # what payers owe survives a restart
            if self._ingest.credit_applies(op.payment):
                chain_rt = self._chains[op.payment.chain_id]
                chain_rt.credit.book.reserve((op.payment.token, op.payment.payer), op.payment.value)
        intake = IntakeStage(
            self._ledger,
            self._tracker,
            {cid: c.new_send for cid, c in self._chains.items()},
            self.config.ledger.group_max,
            credit_limits=self._ingest.credit_limits,
        )
        self._ingest.shared_credit = self._shared() is not None
        self._ingest.intake = intake
        async with trio.open_nursery() as nursery:
            if self.config.ingest.verify_workers:
                pool = VerifyPool(
                    self.config,
                    self.clock,
                    self.config.ingest.verify_workers,
                    batch_max=self.config.ingest.verify_batch_max,
                )
                await nursery.start(pool.run)
                self._ingest.pool = pool
            nursery.start_soon(intake.run)
            nursery.start_soon(self._sales.run)
            nursery.start_soon(
                self._ledger.run_flusher, self.config.ledger.flush_interval_ms / 1000
            )
            for runtime in self._chains.values():
                nursery.start_soon(runtime.run)
            nursery.start_soon(self._sweep_dedup)
            try:
                yield self
            finally:
                nursery.cancel_scope.cancel()

    async def _own_past(self) -> list[int] | None:
        """Shared ledger: this instance, and earlier instances of its name (a restart resumes
        their work at once). None: a single-process ledger, all of it ours."""
        shared = self._shared()
        if shared is None:
            return None
        taken = await self._ledger.run(functools.partial(shared.take_over, same_name_only=True))
        return [shared.instance_id, *taken]

    def _ledger_name(self) -> str:
        """The ledger as an operator's message names it."""
        ledger = self.config.ledger
        return f"ledger {ledger.path}" if ledger.backend == "duckdb" else "the PostgreSQL ledger"

    def _shared(self) -> PgLedger | None:
        sync = self._ledger.sync
        return sync if isinstance(sync, PgLedger) else None

    async def _restore_dedup(self, recovered: Recovered, owners: list[int] | None = None) -> None:
        self._ingest.start_ids_at(recovered.next_payment_id)
        await recovery.restore_replay_keys(
            self._ledger, self._dedup, self._identifiers, recovered, self.clock.now(), owners
        )

    async def _start_chain(
        self,
        chain: ChainConfig,
        rpc: ChainClient,
        recovered: Recovered,
        environ: Mapping[str, str] | None,
    ) -> None:
        keys = signer_keys(chain, dict(environ) if environ is not None else None)
        signers = SignerPool(await self._leased([Signer(k, chain.chain_id) for k in keys], chain))
        adopted = await recovery.adopt_sent_batches(
            chain, rpc, signers, recovered, self.clock, self._ledger, self._ledger_name()
        )
        shared = self._shared()
        batch_ids = (
            BatchIds(recovered.next_batch_id + 1_000_000 * len(self._chains))
            if shared is None
            else BatchIds(0, functools.partial(self._ledger.run, shared.reserve_batch_ids))
        )
        runtime = ChainPipeline(
            chain,
            self.config,
            rpc,
            signers,
            self._recorder,
            self.clock,
            batch_ids,
            len(adopted),
            self._policy_factory(chain),
        )
        for batch in adopted:
            runtime.confirm.adopt(batch)
            for item in batch.items:
                self._tracker.track(item, "submitted", batch.record.tx_hash)
        self._chains[chain.chain_id] = runtime

    async def _leased(self, signers: list[Signer], chain: ChainConfig) -> list[Signer]:
        """Shared ledger: the accounts this instance leased (fencing epochs set); else all."""
        shared = self._shared()
        if shared is None:
            return signers
        most = chain.signers_per_instance or len(signers)
        epochs = await self._ledger.run(
            shared.lease_signers, chain.chain_id, [s.address for s in signers], most
        )
        leased = [s for s in signers if s.address in epochs]
        self._spare_signers[chain.chain_id] = [s for s in signers if s.address not in epochs]
        if not leased:
            raise EngineError(
                f"chain {chain.chain_id}: every configured signer account is leased by another"
                " live instance; give this instance accounts of its own, or set"
                " signers_per_instance so that instances share them"
            )
        for signer in leased:
            signer.lease_epoch = epochs[signer.address]
        log.info("chain %d: leased %d signer account(s)", chain.chain_id, len(leased))
        return leased

    async def _adopt_instances(self, owners: list[int]) -> None:
        """Put the open work of taken-over instances in motion, as a restart would: watch their
        sent batches (rebroadcast), queue their payments in no batch, know their replay keys."""
        recovered = await self._ledger.run(self._ledger.sync.recover, owners)
        await recovery.restore_replay_keys(
            self._ledger, self._dedup, self._identifiers, recovered, self.clock.now(), owners
        )
        watched: set[int] = set()
        for chain_id, runtime in self._chains.items():
            batches = await recovery.rebroadcast_open_batches(
                runtime.config, runtime.rpc, recovered, self.clock
            )
            await self._take_signers(runtime, owners)
            for batch in batches:
                await runtime.slots.acquire()  # released when the batch is final
                runtime.confirm.adopt(batch)
                for item in batch.items:
                    watched.add(item.id)
                    self._tracker.track(item, "submitted", batch.record.tx_hash)
            log.info("chain %d: adopted %d sent batch(es)", chain_id, len(batches))
        for chain_id, items in recovery.unbatched(recovered, watched).items():
            pipeline = self._chains.get(chain_id)
            if pipeline is None:
                log.error("taken-over payments on chain %d, which is not configured", chain_id)
                continue
            for item in items:
                self._tracker.track(item)
                if self._ingest.credit_applies(item.payment):
                    key = (item.payment.token, item.payment.payer)
                    pipeline.credit.book.reserve(key, item.payment.value)
            await pipeline.new_send.send(items)
        log.warning(
            "took over %d open payment(s) of instance(s) %s",
            len(recovered.open_payments),
            owners,
        )

    async def _take_signers(self, runtime: ChainPipeline, owners: list[int]) -> None:
        """Lease the accounts the taken-over instances held (their leases lapsed with their
        heartbeats), if this instance has their keys: it can then fee-bump their batches, and
        sends with them too. Nonces are read after the rebroadcast of their batches."""
        shared = self._shared()
        spare = self._spare_signers.get(runtime.config.chain_id, [])
        if shared is None or not spare:
            return
        chain_id = runtime.config.chain_id
        theirs = set(await self._ledger.run(shared.leases_of, chain_id, owners))
        wanted = [s for s in spare if s.address in theirs]
        if not wanted:
            return
        epochs = await self._ledger.run(
            shared.lease_signers, chain_id, [s.address for s in wanted], len(wanted)
        )
        for signer in wanted:
            if signer.address not in epochs:
                continue
            signer.lease_epoch = epochs[signer.address]
            signer.next_nonce = await runtime.rpc.nonce(signer.address, "pending")
            runtime.signers.add(signer)
            spare.remove(signer)
            log.warning("chain %d: took over signer %s", chain_id, signer.address)

    def _requeue_unbatched(self, recovered: Recovered) -> None:
        watched = {i for c in self._chains.values() for i in c.confirm.watched_item_ids()}
        for chain_id, items in recovery.unbatched(recovered, watched).items():
            runtime = self._chains.get(chain_id)
            if runtime is None:
                raise EngineError(
                    f"the ledger holds unsettled payments on chain {chain_id}, which is not"
                    " configured; add it back to settle them"
                )
            for item in items:
                self._tracker.track(item)
            runtime.batch.preload(items)

    async def _sweep_dedup(self) -> None:
        while True:
            await trio.sleep(DEDUP_SWEEP_S)
            self._dedup.evict_expired(self.clock.now(), DEDUP_GRACE_S)
            self._identifiers.evict_expired(self.clock.now(), DEDUP_GRACE_S)

    # -- the API ----------------------------------------------------------------------------

    def check(self, payload: Any, requirements: Any) -> tuple[Payment | None, Rejected | None]:
        """The stateless checks only (signature, amounts, window); stores nothing."""
        return self._ingest.check(payload, requirements)

    async def submit(self, payload: Any, requirements: Any) -> Accepted | Rejected:
        """Verify, deduplicate and durably record a payment.

        Returns :class:`Accepted` (with the record id) only after the payment is durable (in the
        journal, or committed to the ledger); :class:`Rejected` with an x402 reason code
        otherwise (nothing stored). Submitting the identical payload again returns the same id
        with ``duplicate=True``. Raises :class:`EngineError` if the durable write failed.
        """
        return (await self.submit_many([(payload, requirements)]))[0]

    async def submit_many(self, items: Sequence[tuple[Any, Any]]) -> list[Accepted | Rejected]:
        """:meth:`submit` for several ``(payload, requirements)`` pairs at once, answers in
        order: one verification batch and one durable write for all of them, so the per-payment
        cost is far lower than one :meth:`submit` call each (bulk ingest, replays of a day's
        payments, a facilitator that gathers requests)."""
        assert self._ingest.intake is not None, "engine not running"
        return await self._ingest.admit(await self._ingest.verify_many(items))

    async def verify(
        self, payload: Any, requirements: Any
    ) -> tuple[Payment | None, Rejected | None]:
        """The facilitator's ``/verify``: every check :meth:`submit` makes, and what the ledger
        and the chain already decided: a nonce accepted here before, used or cancelled on
        chain, a balance below the amount, a token without code, and credit control for
        payees that settle later. Stores nothing. Chain state is read in coalesced batches
        (``ingest.state_*``): one ``eth_call`` answers many concurrent verifications."""
        return await self._ingest.verify(payload, requirements)

    async def settle(self, payload: Any, requirements: Any) -> SettleAnswer:
        """The facilitator's ``/settle`` with one payment, one purchase (:class:`SalesDesk`):
        ``success`` once per payment, ever; later settles get ``duplicate_settlement`` with
        the original transaction and settlement id, except a payment-identifier retry of the
        same purchase, which gets the stored answer."""
        return await self._desk.settle(payload, requirements)

    def settlement_mode(self, payee: bytes) -> SettlementMode:
        """``confirmed`` or ``deferred`` for payments to ``payee`` ([service] settings)."""
        return self._desk.settlement_mode(payee)

    async def status(self, record_id: int) -> Outcome | None:
        """The current state of a payment (None: no such record)."""
        current = self._tracker.current(record_id)
        if current is not None:
            return current
        return await self._ledger.run(self._ledger.sync.outcome, record_id)

    async def wait(self, record_id: int, timeout_s: float = math.inf) -> Outcome:
        """Wait until the payment reaches a final state (settled or failed).

        Raises KeyError for an unknown id and trio.TooSlowError on timeout."""
        with trio.fail_after(timeout_s):
            outcome = await self._tracker.wait_final(record_id)
            if outcome is None:
                outcome = await self._ledger.run(self._ledger.sync.outcome, record_id)
            if outcome is None:
                raise KeyError(record_id)
            while not outcome.final:  # another instance's payment (shared ledger): ask again
                await trio.sleep(FOREIGN_POLL_S)
                current = await self._ledger.run(self._ledger.sync.outcome, record_id)
                assert current is not None
                outcome = current
        return outcome

    async def history(self, record_id: int) -> list[dict[str, Any]]:
        return await self._ledger.run(self._ledger.sync.history, record_id)

    async def drain(self, timeout_s: float = math.inf) -> None:
        """Wait until every accepted payment is final."""
        with trio.fail_after(timeout_s):
            while self._tracker.pending() or self._ingest.writes_pending():
                await self._tracker.all_final.wait()
                await trio.lowlevel.checkpoint()

    async def until(
        self, condition: Callable[[Statistics], bool], timeout_s: float = math.inf
    ) -> Statistics:
        """Wait until ``condition`` holds for :meth:`statistics` (re-checked whenever a payment
        or batch changes state, no polling); returns that snapshot. Raises
        ``trio.TooSlowError`` on timeout."""
        with trio.fail_after(timeout_s):
            while not condition(snapshot := self.statistics()):
                await self._tracker.changed.wait()
        return snapshot

    def statistics(self) -> Statistics:
        return self._tracker.snapshot()

    def supported(self) -> dict[str, Any]:
        """The facilitator's /supported document: kinds per network (``exact`` says which
        transfer methods it settles there; ``upto`` names the facilitator address payers
        sign for), and signer addresses."""
        kinds: list[dict[str, Any]] = []
        signers: list[str] = []
        for chain in self.config.chains:
            methods = ["eip3009", "permit2"] if chain.permit2 else ["eip3009"]
            exact = {"assetTransferMethods": methods}
            kinds.append(
                {"x402Version": 2, "scheme": "exact", "network": chain.caip2, "extra": exact}
            )
            for name in chain.network_names:
                kinds.append({"x402Version": 1, "scheme": "exact", "network": name, "extra": exact})
            if chain.upto_batcher:
                kinds.append(
                    {
                        "x402Version": 2,
                        "scheme": "upto",
                        "network": chain.caip2,
                        "extra": {"facilitatorAddress": chain.upto_batcher.lower()},
                    }
                )
            runtime = self._chains.get(chain.chain_id)
            if runtime is not None:
                signers += [s.address for s in runtime.signers.signers]
        return {
            "kinds": kinds,
            "extensions": [PAYMENT_IDENTIFIER],
            "signers": {"eip155:*": signers},
        }

    def state_statistics(self) -> dict[int, ReaderStatistics]:
        """Per chain: the /verify chain-state reader's reads, payments read and cache hits."""
        return {cid: c.state.statistics() for cid, c in self._chains.items()}

    def signature_statistics(self) -> dict[int, SignatureStatistics]:
        """Per chain: on-chain signature checks (smart-wallet payers) made, and signatures."""
        return {cid: c.signatures.statistics() for cid, c in self._chains.items()}

    def rpc_requests(self) -> dict[int, int]:
        """Per chain: JSON-RPC HTTP requests sent since start."""
        return {cid: c.rpc.requests for cid, c in self._chains.items()}

    def sale_statistics(self) -> SaleStatistics:
        return self._sales.statistics()

    def health(self, stall_after_s: float | None = None) -> Health:
        """Whether settlement is moving (see :func:`engine.health.judge_health`), all chains."""
        limit = self.config.service.stall_after_s if stall_after_s is None else stall_after_s
        stats = self.settlement_statistics().values()
        blocked = [s.blocked_since for s in stats if s.blocked_since is not None]
        return judge_health(
            now=self.clock.now(),
            last_progress=self._tracker.last_progress,
            pending=self._tracker.pending(),
            inflight=sum(s.inflight for s in stats),
            queued=sum(s.queued for s in stats),
            blocked_since=min(blocked) if blocked else None,
            free_slots=sum(s.free_slots for s in stats),
            slots=sum(s.slots for s in stats),
            stall_after_s=limit,
        )

    def settlement_statistics(self) -> dict[int, SettlementStatistics]:
        """Per chain: in-flight slots (free of total), batches in flight, fee-bump
        replacements sent, receipts found no longer canonical, payments queued."""
        return {cid: c.statistics() for cid, c in self._chains.items()}

    def inflight_batches(self) -> dict[int, int]:
        """Sent but unconfirmed batches per chain."""
        return {cid: c.confirm.inflight() for cid, c in self._chains.items()}

    def settle_latency(self) -> Histogram:
        """Acceptance-to-final-state latency of the payments finalized since start."""
        return self._tracker.settle_latency

    def settle_now(self, payee: str | None = None) -> int:
        """Settle every waiting payment (of ``payee``, or of everyone) now, whatever the
        schedules: a manual end-of-day sweep. Returns how many payments were waiting."""
        raw = None if payee is None else bytes.fromhex(payee.lower().removeprefix("0x"))
        if raw is not None and len(raw) != 20:
            raise ValueError(f"not an address: {payee!r}")
        return sum(c.batch.settle_now(raw) for c in self._chains.values())

    def payee_queue_depths(self) -> dict[tuple[int, str], int]:
        """Unbatched items per (chain, payee with a schedule of its own; "" for the rest): a
        sweep's progress is this falling to zero."""
        out: dict[tuple[int, str], int] = {}
        for cid, c in self._chains.items():
            for payee, n in c.batch.depth_by_payee().items():
                out[(cid, "" if payee is None else hex_addr(payee))] = n
        return out

    def credit_statistics(self) -> dict[int, dict[str, Any]]:
        """Per chain: unsettled credit per token, debtors, refusals and shortfalls seen."""
        return {
            cid: {
                "owed": {hex_addr(t): v for t, v in c.credit.book.owed_by_token().items()},
                "debtors": len(c.credit.book.debtors()),
                "refused": c.credit.book.refused,
                "shortfalls": c.credit.shortfalls_seen,
            }
            for cid, c in self._chains.items()
        }

    def queue_depths(self) -> dict[int, int]:
        """Pending (unbatched) items per chain."""
        return {cid: c.batch.depth() for cid, c in self._chains.items()}

    async def query(self, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
        """Read-only SQL against the ledger (reports, tests)."""
        return await self._ledger.run(self._ledger.sync.query, sql, params)

    async def query_with_columns(
        self, sql: str, params: list[Any] | None = None
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Read-only SQL with column names (the service's /admin/query)."""
        return await self._ledger.run(self._ledger.sync.query_with_columns, sql, params)

    def ledger_dialect(self) -> str:
        """``duckdb`` or ``postgres``: the SQL an ad hoc query is written in."""
        return "postgres" if self._shared() is not None else "duckdb"


__all__ = ["Engine", "RpcUnavailable"]
