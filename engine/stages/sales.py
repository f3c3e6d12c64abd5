"""One payment, one purchase.

A resource server serves its content when ``/settle`` answers ``success``; so a payment may be
answered ``success`` once, ever. The first ``/settle`` that finds the payment settled (or, in
``deferred`` mode, durable) *sells* it: the sold bit in the dedup index is set with no
checkpoint between test and set (of concurrent callers exactly one wins) and the sale is
written to the ledger before the answer leaves. Every later ``/settle`` of the payment, with any
requirements, from any caller, is refused with ``duplicate_settlement`` and the original
transaction and settlement id, so an honest party can reconcile.

The x402 ``payment-identifier`` extension is the way to retry honestly: a buyer who sends an id
and loses the answer sends the same payload with the same id again and gets the stored answer;
the same id on another payload is refused (``payment_identifier_conflict``).

:class:`SalesDesk` answers /settle; :class:`SaleWriter` makes sales durable, many per ledger
commit (a burst of settles answered by one mined batch is one write); the payment-identifier
bindings are :class:`engine.stages.dedup.Identifiers`.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import trio

from ..clock import Clock, Wakeup
from ..config import EngineConfig, SettlementMode, address_bytes
from ..model import EngineError, Outcome, Payment, Rejected, Sale, SettleAnswer, hex_addr
from ..rules import reasons
from ..store.ledger import AsyncLedger
from .dedup import Claim, DedupIndex, Identifiers
from .ingest import Ingest
from .verify import payment_identifier


class _Group:
    __slots__ = ("done", "error", "sales", "sold_elsewhere")

    def __init__(self) -> None:
        self.sales: list[Sale] = []
        self.done = trio.Event()
        self.error: BaseException | None = None
        self.sold_elsewhere: set[int] = set()  # shared ledger: another instance sold these


class SaleStatistics(msgspec.Struct, frozen=True):
    sold: int
    writes: int


class SaleWriter:
    """Group commit of sales: every sale waiting when a write starts goes into it."""

    def __init__(self, ledger: AsyncLedger, clock: Clock) -> None:
        self._ledger = ledger
        self._clock = clock
        self._open: _Group | None = None
        self._arrived = Wakeup()
        self._sold = 0
        self._writes = 0

    def statistics(self) -> SaleStatistics:
        return SaleStatistics(self._sold, self._writes)

    async def record(self, sale: Sale) -> bool:
        """Return once ``sale`` is in the ledger (True), or another instance's sale of the
        payment is (False: shared ledger); raise what the write raised otherwise.
        Uncancellable once queued (shielded): the seller learns whether it sold."""
        group = self._open
        if group is None:
            group = self._open = _Group()
        group.sales.append(sale)
        self._arrived.set()
        with trio.CancelScope(shield=True):
            await group.done.wait()
        if group.error is not None:
            raise group.error
        return sale.payment_id not in group.sold_elsewhere

    async def bind_identifier(self, identifier: str, key: bytes, valid_before: int) -> bytes:
        """The replay key ``identifier`` is bound to across instances: a shared ledger asks the
        database; a single-process ledger has nothing to ask (no checkpoint either)."""
        if not self._ledger.sync.instance_id:
            return key
        return await self._ledger.run(
            self._ledger.sync.bind_identifier, identifier, key, valid_before
        )

    async def recorded(self, payment_id: int) -> Sale | None:
        """The payment's recorded sale, by whichever instance made it."""
        return await self._ledger.run(self._ledger.sync.sale, payment_id)

    async def run(self) -> None:
        group: _Group | None = None
        try:
            while True:
                if self._open is None:
                    await self._arrived.wait()
                    continue
                group, self._open = self._open, None
                try:
                    at_ms = int(self._clock.now() * 1000)
                    group.sold_elsewhere = await self._ledger.run(
                        self._ledger.sync.record_sales, group.sales, at_ms
                    )
                except Exception as exc:  # disk trouble: every seller in the group is told
                    group.error = exc
                else:
                    self._sold += len(group.sales)
                    self._writes += 1
                group.done.set()
                group = None
        finally:
            stopped = RuntimeError("the engine stopped before the sale was recorded")
            for pending in (group, self._open):
                if pending is not None and not pending.done.is_set():
                    pending.error = stopped
                    pending.done.set()


class SalesDesk:
    """The facilitator's /settle over the engine: accept, then answer by the payee's settlement
    mode, selling each payment once."""

    def __init__(
        self,
        config: EngineConfig,
        ingest: Ingest,
        dedup: DedupIndex,
        identifiers: Identifiers,
        writer: SaleWriter,
        status: Callable[[int], Awaitable[Outcome | None]],
        wait: Callable[[int, float], Awaitable[Outcome]],
    ) -> None:
        self._config = config
        self._ingest = ingest
        self._dedup = dedup
        self._identifiers = identifiers
        self._writer = writer
        self._status = status
        self._wait_final = wait
        self._payee_modes = {
            address_bytes(k): v for k, v in config.service.payee_settlement.items()
        }

    async def _wait(self, record_id: int) -> Outcome:
        return await self._wait_final(record_id, math.inf)

    def settlement_mode(self, payee: bytes) -> SettlementMode:
        """``confirmed`` or ``deferred`` for payments to ``payee`` ([service] settings)."""
        return self._payee_modes.get(payee, self._config.service.settlement)

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
        [(payment, rejected)] = await self._ingest.verify_many([(payload, requirements)])
        if rejected is not None:
            return _refused(rejected)
        assert payment is not None
        payer = hex_addr(payment.payer)
        mode = self.settlement_mode(payment.payee)
        claim, _ = self._dedup.lookup(payment)
        bound_here = False
        if identifier is not None:
            conflict = SettleAnswer(
                False,
                reason=reasons.PAYMENT_ID_CONFLICT,
                message="this payment-identifier was sent with another payment",
                payer=payer,
            )
            bound = self._identifiers.bound(identifier)
            if bound is None:
                # a shared ledger binds it across instances first (one database round trip)
                everywhere = await self._writer.bind_identifier(
                    identifier, payment.key, payment.valid_before
                )
                if everywhere != payment.key:
                    return conflict
                bound_here = self._identifiers.bind(identifier, payment.key, payment.valid_before)
                if not bound_here and self._identifiers.bound(identifier) != payment.key:
                    return conflict  # bound here meanwhile, to another payment
            elif bound != payment.key or claim is Claim.CONFLICT:
                return conflict
        try:
            if claim is Claim.NEW and mode == "deferred" and self._config.ingest.state_checks:
                # deferred answers success before anything is sent: ask the chain first
                rejected = await self._ingest.check_chain_state(payment)
            if rejected is None:
                [result] = await self._ingest.admit([(payment, None)])
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
        with trio.move_on_after(self._config.service.settle_timeout_s):
            outcome = await self._wait(rid)
        if outcome is None:
            pending = await self._status(rid)
            return SettleAnswer(
                False,
                (pending.tx_hash if pending else None) or "",
                reasons.SETTLEMENT_PENDING,
                f"not confirmed within {self._config.service.settle_timeout_s:g} s; settlement"
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
            ours = await self._writer.record(Sale(rid, mode, identifier))
        except Exception as exc:
            self._dedup.unmark_sold(payment)
            self._identifiers.forget_sale(rid)
            raise EngineError(f"the sale of payment {rid} could not be recorded: {exc}") from exc
        if not ours:  # another instance answered success for it first
            self._identifiers.forget_sale(rid)
            return await self._sold_before(payment, rid, identifier)
        current = await self._status(rid)
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
        current = await self._status(rid)
        transaction = (current.tx_hash if current else None) or ""
        payer = hex_addr(payment.payer)
        sale = self._identifiers.sold_with(rid)
        if sale is None and identifier is not None:  # sold by another instance, maybe
            recorded = await self._writer.recorded(rid)
            if recorded is not None and recorded.identifier is not None:
                sale = (recorded.identifier, recorded.mode)
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


def _refused(rejected: Rejected) -> SettleAnswer:
    return SettleAnswer(False, "", rejected.reason, rejected.message, rejected.payer)
