"""Ingest: verify ──► dedup ──► intake, and the checks of /verify.

``admit`` takes verified payments through credit control (for payees that settle later), the
dedup index (a replay returns its record, a rival authorization is refused) and the intake's
group commit: it answers once they are durable. Payment ids are reserved in the ledger in
blocks before they are handed out, so an id never repeats. ``verify`` adds what the ledger and
the chain already decided (a facilitator's /verify), without storing anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import trio

from ..chain.rpc import RpcError, RpcUnavailable
from ..clock import Clock
from ..config import EngineConfig
from ..model import (
    EIP3009,
    Accepted,
    Clash,
    EngineError,
    Payment,
    PendingItem,
    Rejected,
    hex_addr,
)
from ..outcomes import Tracker
from ..rules import reasons
from ..store.ledger import AsyncLedger
from .chainstate import judge
from .dedup import Claim, DedupIndex, Identifiers
from .intake import Group, IntakeStage
from .pipeline import ChainPipeline
from .verify import Verifier, payment_identifier
from .verify_pool import VerifyPool

ID_BLOCK = 10_000  # payment ids reserved per ledger write


class Ingest:
    """What submit, verify and settle share. Used only from the trio thread."""

    def __init__(
        self,
        config: EngineConfig,
        clock: Clock,
        ledger: AsyncLedger,
        tracker: Tracker,
        dedup: DedupIndex,
        identifiers: Identifiers,
        chains: dict[int, ChainPipeline],
    ) -> None:
        self._config = config
        self._clock = clock
        self._ledger = ledger
        self._tracker = tracker
        self._dedup = dedup
        self._identifiers = identifiers
        self._chains = chains  # filled by the engine as chains start
        self._verifier = Verifier(config)
        self.pool: VerifyPool | None = None  # set when verify workers run
        self.intake: IntakeStage | None = None  # set once the engine runs
        # Credit control applies to payments that wait for a window or a schedule.
        listed = {p.payee_address: p.mode for p in config.policy.payees}
        self._credit_default = config.credit.enabled and config.policy.mode != "immediate"
        self._credit_payees = {
            payee for payee, mode in listed.items() if config.credit.enabled and mode != "immediate"
        }
        self._listed_payees = set(listed)
        self._next_id = 1
        self._id_ceiling = 0  # highest id reserved in the ledger
        self._id_lock = trio.Lock()
        self._intake_pending: dict[int, Group] = {}  # record id -> group not yet durable
        # shared ledger: payers' credit is checked across instances at the durable write
        self.shared_credit = False
        self.credit_limits: dict[int, int] = {}  # record id -> limit, for the intake stage

    def start_ids_at(self, next_id: int) -> None:
        """Recovery: hand out ids from ``next_id`` (above every id ever reserved)."""
        self._next_id = next_id
        self._id_ceiling = next_id - 1

    def writes_pending(self) -> int:
        """Payments admitted whose durable write has not finished."""
        return len(self._intake_pending)

    def check(self, payload: Any, requirements: Any) -> tuple[Payment | None, Rejected | None]:
        """The stateless checks, and a rival authorization already on record."""
        payment, rejected = self._verifier.check(payload, requirements, self._clock.now())
        if rejected is not None and rejected.reason == reasons.CONTRACT_SIGNATURE:
            return None, Rejected(  # stateless: only verify and submit ask the chain
                reasons.SIGNATURE if payment is None else _bad_signature(payment),
                "signature does not recover to authorization.from (a smart-wallet payer's"
                " EIP-1271 signature is checked on chain by verify and submit)",
                rejected.payer,
            )
        if payment is not None:
            claim = self._dedup.peek(payment)
            if claim is Claim.CONFLICT:
                return None, Rejected(
                    reasons.NONCE_USED,
                    "another authorization uses this nonce",
                    hex_addr(payment.payer),
                )
        return payment, rejected

    def credit_applies(self, payment: Payment) -> bool:
        if payment.payee in self._listed_payees:
            return payment.payee in self._credit_payees
        return self._credit_default

    def release_credit(self, item: PendingItem) -> None:
        p = item.payment
        runtime = self._chains.get(p.chain_id)
        if runtime is not None and self.credit_applies(p):
            runtime.credit.book.release((p.token, p.payer), p.value)

    async def _read_stale_balances(self, payments: list[Payment]) -> str | None:
        """Read the balances credit decisions need; returns why that failed (None: done)."""
        now = self._clock.now()
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

    async def verify_many(
        self, items: Sequence[tuple[Any, Any]]
    ) -> list[tuple[Payment | None, Rejected | None]]:
        """The stateless checks, in the worker processes when there are any; then the chain's
        word on the signatures only a contract payer may accept (EIP-1271), many per call."""
        if self.pool is not None:
            verdicts = await self.pool.check_many(items)
        else:
            now = self._clock.now()
            verdicts = [self._verifier.check(p, r, now) for p, r in items]
        to_check = [
            i
            for i, (p, r) in enumerate(verdicts)
            if p is not None and r is not None and r.reason == reasons.CONTRACT_SIGNATURE
        ]
        if to_check:
            async with trio.open_nursery() as nursery:
                for i in to_check:
                    nursery.start_soon(self._judge_signature, verdicts, i)
        return verdicts

    async def _judge_signature(
        self, verdicts: list[tuple[Payment | None, Rejected | None]], i: int
    ) -> None:
        payment, _ = verdicts[i]
        assert payment is not None
        payer = hex_addr(payment.payer)
        runtime = self._chains.get(payment.chain_id)
        if runtime is None:  # not running yet (or this chain is not): cannot ask
            verdicts[i] = (
                None,
                Rejected(
                    _bad_signature(payment), "the signature does not recover to the payer", payer
                ),
            )
            return
        try:
            valid = await runtime.signatures.valid(
                payment.payer, self._verifier.digest(payment), payment.signature
            )
        except Exception as exc:  # the node is away or answered nonsense: refuse, say why
            verdicts[i] = (
                None,
                Rejected(
                    reasons.UNEXPECTED_VERIFY,
                    f"the signature could not be checked on chain: {exc}",
                    payer,
                ),
            )
            return
        verdicts[i] = (
            (payment, None)
            if valid
            else (
                None,
                Rejected(
                    _bad_signature(payment),
                    "the signature does not recover to the payer, nor does the payer accept it"
                    " (EIP-1271)",
                    payer,
                ),
            )
        )

    async def admit(
        self, verdicts: Sequence[tuple[Payment | None, Rejected | None]]
    ) -> list[Accepted | Rejected]:
        """Credit, dedup and the durable write for verified payments; answers in order."""
        assert self.intake is not None, "engine not running"
        now = self._clock.now()
        results: list[Accepted | Rejected | None] = [None] * len(verdicts)
        on_credit = [p is not None and self.credit_applies(p) for p, _ in verdicts]
        credit = [p for (p, _), c in zip(verdicts, on_credit, strict=True) if c and p]
        credit_error = await self._read_stale_balances(credit) if credit else None
        # (index, group, record id, payment, is it this call's own new record)
        waits: list[tuple[int, Group, int, Payment, bool]] = []
        reserved: set[int] = set()  # record ids with credit reserved
        try:
            for i, (payment, rejected) in enumerate(verdicts):
                if rejected is None and payment is not None and on_credit[i]:
                    await self.intake.wait_for_room()  # then no checkpoint until admitted
                    rejected = self._check_credit(payment, credit_error)
                if rejected is not None:
                    self._tracker.rejected[rejected.reason] += 1
                    results[i] = rejected
                    continue
                assert payment is not None
                # Wait for room (and an id reserved) before claiming, so that claim, admission
                # and registration happen with no checkpoint in between: a concurrent identical
                # submit then always finds the group to wait on and is never acknowledged early.
                await self._room_and_id()
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
                    group = self.intake.admit(PendingItem(rid, payment, now))
                    self._intake_pending[rid] = group
                    waits.append((i, group, rid, payment, True))
                    if on_credit[i]:
                        book = self._chains[payment.chain_id].credit.book
                        key = (payment.token, payment.payer)
                        book.reserve(key, payment.value)
                        reserved.add(rid)
                        if self.shared_credit:  # the shared ledger checks across instances
                            limit = book.limit(key)
                            assert limit is not None  # _check_credit passed: it was read
                            self.credit_limits[rid] = limit
            waited: set[int] = set()
            for _, group, _, _, _ in waits:
                if id(group) not in waited:
                    waited.add(id(group))
                    await group.wait_durable()  # once queued, see it through (uncancellable)
        finally:
            for _, _, rid, _, new in waits:
                if new:
                    self._intake_pending.pop(rid, None)
        self._answer_durable(waits, reserved, results)
        answers = [r for r in results if r is not None]
        assert len(answers) == len(results)
        return answers

    def _answer_clash(self, payment: Payment, clash: Clash) -> Accepted | Rejected:
        """A payment the shared ledger did not record as ours: over the payer's credit across
        instances, or its replay key is another instance's record: the identical payment is
        that record (remembered here too); any other is refused."""
        if clash.refusal is not None:
            self._chains[payment.chain_id].credit.book.refused += 1
            self._tracker.rejected[reasons.INSUFFICIENT_FUNDS] += 1
            return Rejected(reasons.INSUFFICIENT_FUNDS, clash.refusal, hex_addr(payment.payer))
        owner = clash.owner
        assert owner is not None
        if not clash.identical:
            self._tracker.rejected[reasons.NONCE_USED] += 1
            return Rejected(
                reasons.NONCE_USED,
                "another authorization uses this nonce",
                hex_addr(payment.payer),
            )
        if self._dedup.peek(payment) is Claim.NEW:
            self._dedup.restore(payment, owner)
        self._tracker.duplicates += 1
        return Accepted(owner, hex_addr(payment.payer), duplicate=True)

    async def _room_and_id(self) -> None:
        """Return with room in the intake and a reserved id, and no checkpoint after that."""
        assert self.intake is not None
        while True:
            if self._next_id > self._id_ceiling:
                await self._reserve_ids()
                continue
            await self.intake.wait_for_room()
            if self._next_id <= self._id_ceiling:
                return

    def _answer_durable(
        self,
        waits: list[tuple[int, Group, int, Payment, bool]],
        reserved: set[int],
        results: list[Accepted | Rejected | None],
    ) -> None:
        """Fill in the answers of payments whose group was written; undo the claims (dedup,
        credit) of those whose write failed, and raise."""
        error: BaseException | None = None
        for i, group, rid, payment, new in waits:
            rival = group.rivals.get(rid)
            self.credit_limits.pop(rid, None)  # taken by the intake stage, unless it failed
            if group.error is not None or rival is not None:
                if new:
                    self._dedup.release(payment, rid)
                    if rid in reserved:
                        key = (payment.token, payment.payer)
                        self._chains[payment.chain_id].credit.book.release(key, payment.value)
                if group.error is not None:
                    error = group.error
                    continue
            if rival is not None:  # not recorded as ours (shared ledger)
                results[i] = self._answer_clash(payment, rival)
                continue
            if not new:
                self._tracker.duplicates += 1
            results[i] = Accepted(rid, hex_addr(payment.payer), duplicate=not new)
        if error is not None:
            raise EngineError(f"ledger write failed: {error}") from error

    async def verify(
        self, payload: Any, requirements: Any
    ) -> tuple[Payment | None, Rejected | None]:
        """See :meth:`engine.engine.Engine.verify`."""
        identifier = payment_identifier(payload)
        if isinstance(identifier, Rejected):
            return None, identifier
        [(payment, rejected)] = await self.verify_many([(payload, requirements)])
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
        if self.credit_applies(payment):
            rejected = self._check_credit(payment, await self._read_stale_balances([payment]))
            if rejected is not None:
                return None, rejected
        if self._config.ingest.state_checks:
            rejected = await self.check_chain_state(payment)
            if rejected is not None:
                return None, rejected
        return payment, None

    async def check_chain_state(self, payment: Payment) -> Rejected | None:
        try:
            state = await self._chains[payment.chain_id].state.read(
                payment.token, payment.payer, payment.nonce, payment.method
            )
        except Exception as exc:  # the node is down or answered nonsense: refuse, say why
            return Rejected(
                reasons.UNEXPECTED_VERIFY,
                f"chain state could not be read: {exc}",
                hex_addr(payment.payer),
            )
        return judge(payment, state)

    async def _reserve_ids(self) -> None:
        """Reserve the next block of payment ids in the ledger before handing any out (ids
        never repeat, whatever a damaged journal loses)."""
        async with self._id_lock:
            if self._next_id <= self._id_ceiling:
                return  # another caller reserved meanwhile
            try:
                first, last = await self._ledger.run(
                    self._ledger.sync.reserve_payment_ids, ID_BLOCK, int(self._clock.now() * 1000)
                )
            except Exception as exc:  # the ledger is away: nothing can be accepted now
                raise EngineError(f"ledger unavailable: {exc}") from exc
            if first != self._next_id:  # a shared ledger: another instance took the ids between
                assert first > self._next_id, (first, self._next_id)
                self._next_id = first
            self._id_ceiling = last

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


def _bad_signature(payment: Payment) -> str:
    """The reason code for a payment whose signature is not its payer's."""
    return reasons.SIGNATURE if payment.method == EIP3009 else reasons.PERMIT2_SIGNATURE
