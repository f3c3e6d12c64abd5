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

from . import reasons, recovery
from .chainstate import ReaderStatistics, judge
from .clock import Clock, TrioWallClock
from .config import ChainConfig, EngineConfig, SettlementMode, signer_keys, validate
from .dedup import Claim, DedupIndex
from .health import Health, judge_health
from .intake import Group, IntakeStage
from .ledger import AsyncLedger, Ledger
from .metrics import Histogram
from .model import (
    Accepted,
    EngineError,
    Outcome,
    Payment,
    PendingItem,
    Recovered,
    Rejected,
    Sale,
    SettleAnswer,
    hex_addr,
)
from .outcomes import Recorder, Statistics, Tracker
from .pipeline import ChainPipeline, SettlementStatistics
from .policy import BatchPolicy, schedule_policy
from .rpc import ChainClient, Rpc, RpcError, RpcUnavailable
from .sales import Identifiers, SaleStatistics, SaleWriter
from .signer import Signer, SignerPool
from .submit import BatchIds
from .verify import PAYMENT_IDENTIFIER, Verifier, payment_identifier
from .verify_pool import VerifyPool

log = logging.getLogger("x402_engine.engine")
T = TypeVar("T")

DEDUP_GRACE_S = recovery.DEDUP_GRACE_S
ID_BLOCK = 10_000  # payment ids reserved per ledger write
DEDUP_SWEEP_S = 60.0


class Engine:
    """The batching settlement engine. Open it with :meth:`Engine.open`."""

    def __init__(self, config: EngineConfig, clock: Clock, ledger: AsyncLedger) -> None:
        self.config = config
        self.clock = clock
        self._ledger = ledger
        self._verifier = Verifier(config)
        self._verify_pool: VerifyPool | None = None
        # Credit control applies to payments that wait for a window or a schedule.
        listed = {bytes.fromhex(p.payee[2:]): p.mode for p in config.policy.payees}
        self._credit_default = config.credit.enabled and config.policy.mode != "immediate"
        self._credit_payees = {
            payee for payee, mode in listed.items() if config.credit.enabled and mode != "immediate"
        }
        self._listed_payees = set(listed)
        self._dedup = DedupIndex()
        self._identifiers = Identifiers()
        self._sales = SaleWriter(ledger, clock)
        self._payee_modes = {
            bytes.fromhex(k[2:].lower()): v for k, v in config.service.payee_settlement.items()
        }
        self._tracker = Tracker(clock)
        self._tracker.on_final.append(self._release_credit)
        self._recorder = Recorder(ledger, self._tracker, clock)
        self._chains: dict[int, ChainPipeline] = {}
        self._next_id = 1
        self._id_ceiling = 0  # highest id reserved in the ledger
        self._id_lock = trio.Lock()
        self._intake_pending: dict[int, Group] = {}  # record id -> group not yet durable
        self._intake: IntakeStage | None = None
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
        clock: Clock | None = None,
        environ: Mapping[str, str] | None = None,
        policy: Callable[[ChainConfig], BatchPolicy] | None = None,
        chain_client: Callable[[ChainConfig], ChainClient] | None = None,
        io_threads: bool = True,
    ) -> AsyncIterator[Engine]:
        """Start the engine: recover from the ledger, then run until the block exits.

        ``clock`` is the engine's one source of time (default: wall time following trio's
        clock); ``environ`` replaces ``os.environ`` for signer keys; ``policy`` builds each
        chain's default batching policy (default: the one ``[policy]`` describes; payees in
        ``[[policy.payees]]`` keep their own); ``chain_client`` makes each chain's client
        (default: JSON-RPC to ``rpc_url``; the seeded simulator passes its fake chain);
        ``io_threads=False`` runs ledger I/O inline on the trio thread (deterministic
        simulation only: it blocks the engine for every write).
        """
        validate(config)
        open_ledger = functools.partial(
            Ledger,
            config.ledger.path,
            journal=config.ledger.journal,
            journal_segment_bytes_max=config.ledger.journal_segment_mb << 20,
        )
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
        recovered = await self._ledger.run(self._ledger.sync.recover)
        await self._restore_dedup(recovered)
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
            if self._credit_applies(op.payment):
                chain_rt = self._chains[op.payment.chain_id]
                chain_rt.credit.book.reserve((op.payment.token, op.payment.payer), op.payment.value)
        self._intake = IntakeStage(
            self._ledger,
            self._tracker,
            {cid: c.new_send for cid, c in self._chains.items()},
            self.config.ledger.group_max,
        )
        async with trio.open_nursery() as nursery:
            if self.config.ingest.verify_workers:
                self._verify_pool = VerifyPool(
                    self.config,
                    self.clock,
                    self.config.ingest.verify_workers,
                    batch_max=self.config.ingest.verify_batch_max,
                )
                await nursery.start(self._verify_pool.run)
            nursery.start_soon(self._intake.run)
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

    async def _restore_dedup(self, recovered: Recovered) -> None:
        self._next_id = recovered.next_payment_id
        self._id_ceiling = recovered.next_payment_id - 1
        await recovery.restore_replay_keys(
            self._ledger, self._dedup, self._identifiers, recovered, self.clock.now()
        )

    async def _start_chain(
        self,
        chain: ChainConfig,
        rpc: ChainClient,
        recovered: Recovered,
        environ: Mapping[str, str] | None,
    ) -> None:
        keys = signer_keys(chain, dict(environ) if environ is not None else None)
        signers = SignerPool([Signer(k, chain.chain_id) for k in keys])
        adopted = await recovery.adopt_sent_batches(chain, rpc, signers, recovered, self.clock)
        runtime = ChainPipeline(
            chain,
            self.config,
            rpc,
            signers,
            self._recorder,
            self.clock,
            BatchIds(recovered.next_batch_id + 1_000_000 * len(self._chains)),
            len(adopted),
            self._policy_factory(chain),
        )
        for batch in adopted:
            runtime.confirm.adopt(batch)
            for item in batch.items:
                self._tracker.track(item, "submitted", batch.record.tx_hash)
        self._chains[chain.chain_id] = runtime

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

    # -- credit -----------------------------------------------------------------------------

    def _credit_applies(self, payment: Payment) -> bool:
        if payment.payee in self._listed_payees:
            return payment.payee in self._credit_payees
        return self._credit_default

    def _release_credit(self, item: PendingItem) -> None:
        p = item.payment
        runtime = self._chains.get(p.chain_id)
        if runtime is not None and self._credit_applies(p):
            runtime.credit.book.release((p.token, p.payer), p.value)

    async def _read_stale_balances(self, payments: list[Payment]) -> str | None:
        """Read the balances credit decisions need; returns why that failed (None: done)."""
        now = self.clock.now()
        by_chain: dict[int, set[tuple[bytes, bytes]]] = {}
        for p in payments:
            by_chain.setdefault(p.chain_id, set()).add((p.token, p.payer))
        for chain_id, keys in by_chain.items():
            runtime = self._chains[chain_id]
            stale = runtime.credit.book.stale(keys, now)
            if stale:
                try:
                    await runtime.credit.read_balances(stale)
                except (RpcError, RpcUnavailable) as exc:
                    return f"payer balances could not be read: {exc}"
        return None

    # -- the API ----------------------------------------------------------------------------

    def check(self, payload: Any, requirements: Any) -> tuple[Payment | None, Rejected | None]:
        """Verify without storing anything (the facilitator's /verify)."""
        payment, rejected = self._verifier.check(payload, requirements, self.clock.now())
        if payment is not None:
            claim = self._dedup.peek(payment)
            if claim is Claim.CONFLICT:
                return None, Rejected(
                    reasons.NONCE_USED,
                    "another authorization uses this nonce",
                    hex_addr(payment.payer),
                )
        return payment, rejected

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
        assert self._intake is not None, "engine not running"
        return await self._admit(await self._verify_many(items))

    async def _verify_many(
        self, items: Sequence[tuple[Any, Any]]
    ) -> list[tuple[Payment | None, Rejected | None]]:
        """The stateless checks, in the worker processes when there are any."""
        if self._verify_pool is not None:
            return await self._verify_pool.check_many(items)
        now = self.clock.now()
        return [self._verifier.check(p, r, now) for p, r in items]

    async def _admit(
        self, verdicts: Sequence[tuple[Payment | None, Rejected | None]]
    ) -> list[Accepted | Rejected]:
        """Credit, dedup and the durable write for verified payments; answers in order."""
        assert self._intake is not None, "engine not running"
        now = self.clock.now()
        results: list[Accepted | Rejected | None] = [None] * len(verdicts)
        on_credit = [p is not None and self._credit_applies(p) for p, _ in verdicts]
        credit = [p for (p, _), c in zip(verdicts, on_credit, strict=True) if c and p]
        credit_error = await self._read_stale_balances(credit) if credit else None
        # (index, group, record id, payment, is it this call's own new record)
        waits: list[tuple[int, Group, int, Payment, bool]] = []
        reserved: set[int] = set()  # record ids with credit reserved
        try:
            for i, (payment, rejected) in enumerate(verdicts):
                if rejected is None and payment is not None and on_credit[i]:
                    await self._intake.wait_for_room()  # then no checkpoint until admitted
                    rejected = self._check_credit(payment, credit_error)
                if rejected is not None:
                    self._tracker.rejected[rejected.reason] += 1
                    results[i] = rejected
                    continue
                assert payment is not None
                # Wait for room (and an id reserved) before claiming, so that claim, admission
                # and registration happen with no checkpoint in between: a concurrent identical
                # submit then always finds the group to wait on and is never acknowledged early.
                while True:
                    if self._next_id > self._id_ceiling:
                        await self._reserve_ids()
                        continue
                    await self._intake.wait_for_room()
                    if self._next_id <= self._id_ceiling:
                        break
                rid = self._next_id
                claim, owner = self._dedup.claim(payment, rid)
                if claim is Claim.CONFLICT:
                    self._tracker.rejected[reasons.NONCE_USED] += 1
                    results[i] = Rejected(
                        reasons.NONCE_USED,
                        "another authorization uses this nonce",
                        hex_addr(payment.payer),
                    )
                elif claim is Claim.SAME:
                    pending = self._intake_pending.get(owner)
                    if pending is None:
                        self._tracker.duplicates += 1
                        results[i] = Accepted(owner, hex_addr(payment.payer), duplicate=True)
                    else:
                        waits.append((i, pending, owner, payment, False))
                else:
                    self._next_id += 1
                    group = self._intake.admit(PendingItem(rid, payment, now))
                    self._intake_pending[rid] = group
                    waits.append((i, group, rid, payment, True))
                    if on_credit[i]:
                        runtime = self._chains[payment.chain_id]
                        runtime.credit.book.reserve((payment.token, payment.payer), payment.value)
                        reserved.add(rid)
            waited: set[int] = set()
            for _, group, _, _, _ in waits:
                if id(group) not in waited:
                    waited.add(id(group))
                    await group.wait_durable()  # once queued, see it through (uncancellable)
        finally:
            for _, _, rid, _, new in waits:
                if new:
                    self._intake_pending.pop(rid, None)
        error: BaseException | None = None
        for i, group, rid, payment, new in waits:
            if group.error is not None:
                error = group.error
                if new:
                    self._dedup.release(payment, rid)
                    if rid in reserved:
                        key = (payment.token, payment.payer)
                        self._chains[payment.chain_id].credit.book.release(key, payment.value)
                continue
            if not new:
                self._tracker.duplicates += 1
            results[i] = Accepted(rid, hex_addr(payment.payer), duplicate=not new)
        if error is not None:
            raise EngineError(f"ledger write failed: {error}") from error
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    # -- verify and settle: the facilitator's two calls --------------------------------------

    def settlement_mode(self, payee: bytes) -> SettlementMode:
        """``confirmed`` or ``deferred`` for payments to ``payee`` ([service] settings)."""
        return self._payee_modes.get(payee, self.config.service.settlement)

    async def verify(
        self, payload: Any, requirements: Any
    ) -> tuple[Payment | None, Rejected | None]:
        """The facilitator's ``/verify``: every check :meth:`submit` makes, and what the ledger
        and the chain already decided: a nonce accepted here before, used or cancelled on
        chain, a balance below the amount, a token without code, and credit control for
        payees that settle later. Stores nothing. Chain state is read in coalesced batches
        (``ingest.state_*``): one ``eth_call`` answers many concurrent verifications."""
        identifier = payment_identifier(payload)
        if isinstance(identifier, Rejected):
            return None, identifier
        [(payment, rejected)] = await self._verify_many([(payload, requirements)])
        if rejected is not None:
            return None, rejected
        assert payment is not None
        payer = hex_addr(payment.payer)
        claim, owner = self._dedup.lookup(payment)
        if claim is Claim.CONFLICT:
            return None, Rejected(
                reasons.NONCE_USED, "another authorization uses this nonce", payer
            )
        if claim is Claim.SAME:
            if identifier is not None and self._identifiers.bound(identifier) == payment.key:
                return payment, None  # a retry of the same purchase: /settle answers it
            return None, Rejected(
                reasons.NONCE_USED, f"this authorization was already accepted ({owner})", payer
            )
        if identifier is not None and self._identifiers.bound(identifier) is not None:
            return None, Rejected(
                reasons.PAYMENT_ID_CONFLICT,
                "this payment-identifier was sent with another payment",
                payer,
            )
        if self._credit_applies(payment):
            rejected = self._check_credit(payment, await self._read_stale_balances([payment]))
            if rejected is not None:
                return None, rejected
        if self.config.ingest.state_checks:
            rejected = await self._check_chain_state(payment)
            if rejected is not None:
                return None, rejected
        return payment, None

    async def _check_chain_state(self, payment: Payment) -> Rejected | None:
        try:
            state = await self._chains[payment.chain_id].state.read(
                payment.token, payment.payer, payment.nonce
            )
        except Exception as exc:  # the node is down or answered nonsense: refuse, say why
            return Rejected(
                reasons.UNEXPECTED_VERIFY,
                f"chain state could not be read: {exc}",
                hex_addr(payment.payer),
            )
        return judge(payment, state)

    async def settle(self, payload: Any, requirements: Any) -> SettleAnswer:
        """The facilitator's ``/settle`` with one payment, one purchase.

        Accepts the payment (durably, as :meth:`submit`), then answers by the payee's
        settlement mode: ``deferred`` at once, ``confirmed`` when its batch is mined, or
        ``settlement_pending`` (with the batch's transaction once sent) after
        ``service.settle_timeout_s``. ``success`` is answered once per payment, ever: every
        later settle of it gets ``duplicate_settlement`` with the original transaction and
        settlement id, except a retry with the payment-identifier the sale was made with,
        which gets the stored answer. A failed payment answers its failure every time."""
        identifier = payment_identifier(payload)
        if isinstance(identifier, Rejected):
            return _refused(identifier)
        [(payment, rejected)] = await self._verify_many([(payload, requirements)])
        if rejected is not None:
            return _refused(rejected)
        assert payment is not None
        payer = hex_addr(payment.payer)
        mode = self.settlement_mode(payment.payee)
        claim, _ = self._dedup.lookup(payment)
        bound_here = False
        if identifier is not None:
            bound = self._identifiers.bound(identifier)
            if bound is None:
                bound_here = self._identifiers.bind(identifier, payment.key, payment.valid_before)
            elif bound != payment.key or claim is Claim.CONFLICT:
                return SettleAnswer(
                    False,
                    reason=reasons.PAYMENT_ID_CONFLICT,
                    message="this payment-identifier was sent with another payment",
                    payer=payer,
                )
        try:
            if claim is Claim.NEW and mode == "deferred" and self.config.ingest.state_checks:
                # deferred answers success before anything is sent: ask the chain first
                rejected = await self._check_chain_state(payment)
            if rejected is None:
                [result] = await self._admit([(payment, None)])
            else:
                result = rejected
        except BaseException:
            if bound_here and identifier is not None:
                self._identifiers.unbind(identifier, payment.key)
            raise
        if isinstance(result, Rejected):
            if bound_here and identifier is not None:
                self._identifiers.unbind(identifier, payment.key)
            return _refused(result)
        return await self._answer_settle(payment, result.id, identifier, mode)

    async def _answer_settle(
        self, payment: Payment, rid: int, identifier: str | None, mode: SettlementMode
    ) -> SettleAnswer:
        payer = hex_addr(payment.payer)
        if self._dedup.is_sold(payment):
            return await self._sold_before(payment, rid, identifier)
        if mode == "deferred":
            return await self._sell(payment, rid, identifier, mode, "")
        outcome: Outcome | None = None
        with trio.move_on_after(self.config.service.settle_timeout_s):
            outcome = await self.wait(rid)
        if outcome is None:
            pending = await self.status(rid)
            return SettleAnswer(
                False,
                (pending.tx_hash if pending else None) or "",
                reasons.SETTLEMENT_PENDING,
                f"not confirmed within {self.config.service.settle_timeout_s:g} s; settlement"
                f" {rid} continues",
                payer,
                rid,
                state=pending.state if pending else None,
            )
        if outcome.state != "settled":
            return SettleAnswer(
                False,
                outcome.tx_hash or "",
                outcome.reason or reasons.UNEXPECTED_SETTLE,
                outcome.message,
                payer,
                rid,
                state=outcome.state,
            )
        return await self._sell(payment, rid, identifier, mode, outcome.tx_hash or "")

    async def _sell(
        self,
        payment: Payment,
        rid: int,
        identifier: str | None,
        mode: SettlementMode,
        transaction: str,
    ) -> SettleAnswer:
        """Answer success if nobody did before (test and set with no checkpoint between),
        once the sale is in the ledger."""
        claim, owner = self._dedup.lookup(payment)
        if claim is not Claim.SAME or owner != rid:  # forgotten: its validBefore is long past
            return SettleAnswer(
                False,
                transaction,
                reasons.VALID_BEFORE,
                "the authorization expired before it could be answered",
                hex_addr(payment.payer),
                rid,
            )
        if not self._dedup.mark_sold(payment):
            return await self._sold_before(payment, rid, identifier)
        if identifier is not None:
            self._identifiers.record_sale(rid, identifier, mode)
        try:
            await self._sales.record(Sale(rid, mode, identifier))
        except Exception as exc:
            self._dedup.unmark_sold(payment)
            self._identifiers.forget_sale(rid)
            raise EngineError(f"the sale of payment {rid} could not be recorded: {exc}") from exc
        current = await self.status(rid)
        return SettleAnswer(
            True,
            transaction,
            payer=hex_addr(payment.payer),
            settlement_id=rid,
            amount=payment.value,
            state=current.state if current else None,
        )

    async def _sold_before(
        self, payment: Payment, rid: int, identifier: str | None
    ) -> SettleAnswer:
        """A settle of a payment an earlier settle already answered with success."""
        current = await self.status(rid)
        transaction = (current.tx_hash if current else None) or ""
        payer = hex_addr(payment.payer)
        sale = self._identifiers.sold_with(rid)
        if identifier is not None and sale is not None and sale[0] == identifier:
            # the same purchase asked again (payment-identifier): the stored answer
            return SettleAnswer(
                True,
                transaction if sale[1] == "confirmed" else "",
                payer=payer,
                settlement_id=rid,
                amount=payment.value,
                state=current.state if current else None,
            )
        where = f" in transaction {transaction}" if transaction else ""
        return SettleAnswer(
            False,
            transaction,
            reasons.DUPLICATE_SETTLEMENT,
            f"payment {rid} was already settled{where} and answered to an earlier /settle:"
            " one payment buys once",
            payer,
            rid,
            state=current.state if current else None,
        )

    async def _reserve_ids(self) -> None:
        """Reserve the next block of payment ids in the ledger before handing any out (ids
        never repeat, whatever a damaged journal loses)."""
        async with self._id_lock:
            if self._next_id <= self._id_ceiling:
                return  # another caller reserved meanwhile
            upto = self._next_id + ID_BLOCK - 1
            self._id_ceiling = await self._ledger.run(
                self._ledger.sync.reserve_ids, upto, int(self.clock.now() * 1000)
            )

    def _check_credit(self, payment: Payment, read_error: str | None) -> Rejected | None:
        """Refuse a payment that would lend the payer more than they hold (or the cap).
        A replay of a payment on record is not new credit and passes."""
        if self._dedup.peek(payment) is not Claim.NEW:
            return None
        payer = hex_addr(payment.payer)
        if read_error is not None:
            return Rejected(reasons.UNEXPECTED_VERIFY, read_error, payer)
        book = self._chains[payment.chain_id].credit.book
        why = book.check((payment.token, payment.payer), payment.value)
        if why is None:
            return None
        book.refused += 1
        return Rejected(reasons.INSUFFICIENT_FUNDS, why, payer)

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
        return outcome

    async def history(self, record_id: int) -> list[dict[str, Any]]:
        return await self._ledger.run(self._ledger.sync.history, record_id)

    async def drain(self, timeout_s: float = math.inf) -> None:
        """Wait until every accepted payment is final."""
        with trio.fail_after(timeout_s):
            while self._tracker.pending() or self._intake_pending:
                await self._tracker.all_final.wait()
                await trio.lowlevel.checkpoint()

    def statistics(self) -> Statistics:
        return self._tracker.snapshot()

    def supported(self) -> dict[str, Any]:
        """The facilitator's /supported document: kinds per network, and signer addresses."""
        kinds: list[dict[str, Any]] = []
        signers: list[str] = []
        for chain in self.config.chains:
            kinds.append({"x402Version": 2, "scheme": "exact", "network": chain.caip2})
            for name in chain.network_names:
                kinds.append({"x402Version": 1, "scheme": "exact", "network": name})
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


def _refused(rejected: Rejected) -> SettleAnswer:
    return SettleAnswer(False, "", rejected.reason, rejected.message, rejected.payer)


__all__ = ["Engine", "RpcUnavailable"]
