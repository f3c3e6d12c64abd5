"""The submit stage (one per chain): simulate, size, price, sign, record, broadcast.

For each planned batch: drop items that can no longer make their deadline; ``eth_call`` the
batch and fail the items that would revert (with the token's reason); size the transaction from
the simulation (compact: the gas the item calls used; aggregate3: a per-item bound the
simulation ran under) or, with simulation off, ``eth_estimateGas``, and split if the batch
would exceed the per-transaction gas cap; choose EIP-1559 fees under the configured maximum;
sign with a local nonce; write the signed transaction and the items' ``submitted`` state to the
ledger (write-ahead), and only then broadcast.

A planned batch goes out as up to three transactions, one per route (:func:`routes`): EIP-3009
payments through the batcher's ``settle``/``settleSigned``, Permit2 ``exact`` payments through
its ``settleCalls`` (each item a call of the x402 exact proxy), and ``upto`` payments through
this facilitator's operator batcher (the only caller the payers' signatures allow).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable

import msgspec
import trio

from ..chain import codec
from ..chain.rpc import ChainClient, RpcError, RpcUnavailable
from ..chain.signer import Signer, SignerPool
from ..clock import Clock
from ..config import SEND_MARGIN_S, ChainConfig
from ..model import (
    PERMIT2_UPTO,
    Batch,
    BatchRecord,
    InflightBatch,
    PaymentEvent,
    PendingItem,
)
from ..outcomes import Recorder
from ..rules import reasons
from ..rules.fees import Fees, choose_fees
from .reconcile import nonces_used, settled_elsewhere

log = logging.getLogger("x402_engine.submit")

ATTEMPTS_MAX = 5
SETTLE_OVERHEAD_GAS = 30_000  # settle()'s own work beyond the item calls, with headroom
FEE_WAIT_MAX_S = 120.0


class Triage(msgspec.Struct, frozen=True):
    late: list[PendingItem]  # can no longer be sent before validBefore
    exhausted: list[PendingItem]  # tried in ATTEMPTS_MAX batches already
    send: list[PendingItem]  # the rest, each counting one more attempt


def triage(items: list[PendingItem], now: float) -> Triage:
    """What a planned batch still sends (pure)."""
    late = [i for i in items if i.payment.valid_before <= now + SEND_MARGIN_S]
    timely = [i for i in items if i.payment.valid_before > now + SEND_MARGIN_S]
    return Triage(
        late=late,
        exhausted=[i for i in timely if i.attempts >= ATTEMPTS_MAX],
        send=[
            msgspec.structs.replace(i, attempts=i.attempts + 1)
            for i in timely
            if i.attempts < ATTEMPTS_MAX
        ],
    )


def routes(items: list[PendingItem]) -> list[list[PendingItem]]:
    """The items split by how they settle (EIP-3009, Permit2 exact, upto), order kept (pure)."""
    by_method: dict[int, list[PendingItem]] = {}
    for item in items:
        by_method.setdefault(item.payment.method, []).append(item)
    return list(by_method.values())


class BatchIds:
    """Allocates batch ids (one counter for all chains)."""

    def __init__(
        self,
        first: int,
        refill: Callable[[int], Awaitable[tuple[int, int]]] | None = None,
        block: int = 64,
    ) -> None:
        self._next = first
        self._last = first - 1 if refill is not None else math.inf
        self._refill = refill  # shared ledger: blocks no other instance gets
        self._block = block

    async def next(self) -> int:
        if self._refill is not None and self._next > self._last:
            self._next, self._last = await self._refill(self._block)
        value = self._next
        self._next += 1
        return value


class SubmitStage:
    def __init__(
        self,
        chain: ChainConfig,
        rpc: ChainClient,
        signers: SignerPool,
        recorder: Recorder,
        clock: Clock,
        batch_ids: BatchIds,
        slots: trio.Semaphore,
        requeue: trio.MemorySendChannel[list[PendingItem]],
        confirm: trio.MemorySendChannel[InflightBatch],
    ) -> None:
        self.chain = chain
        self._rpc = rpc
        self._signers = signers
        self._recorder = recorder
        self._clock = clock
        self._batch_ids = batch_ids
        self._slots = slots
        self._requeue = requeue
        self._confirm = confirm
        self._batcher = chain.batcher_address
        self._aggregate_target = chain.aggregate3_target
        self._upto_batcher = chain.upto_batcher_address
        self.dropped_in_simulation = 0
        self._handled: set[int] = set()  # item ids of this batch recorded or handed on

    async def run(self, receive: trio.MemoryReceiveChannel[Batch]) -> None:
        async with receive, self._requeue, self._confirm:
            async for batch in receive:
                await self._process(batch.token, batch.items)

    async def _process(self, token: bytes, items: list[PendingItem]) -> None:
        sorted_out = triage(items, self._clock.now())
        if sorted_out.late:
            await self._recorder.fail(
                sorted_out.late,
                reasons.VALID_BEFORE,
                "authorization expired before it could be sent",
            )
        if sorted_out.exhausted:
            await self._fail_exhausted(token, sorted_out.exhausted)
        items = sorted_out.send
        if not items:
            return
        self._handled = set()
        try:
            for part in (
                p for route in routes(items) for p in self._aggregate3_parts(token, route)
            ):
                sim_gas: int | None = None
                if self.chain.simulate:
                    part, sim_gas = await self._simulate(token, part)
                if part:
                    await self._send_sized(token, part, sim_gas)
        except (RpcUnavailable, RpcError) as exc:
            # Only what is neither decided nor on record in a sent batch goes back: an item
            # of a part already recorded belongs to the confirm stage.
            rest = [i for i in items if i.id not in self._handled]
            log.warning(
                "%d items go back to the pool: RPC trouble before sending: %s", len(rest), exc
            )
            if rest:
                await self._give_back(rest, f"RPC trouble before sending: {exc}")

    async def _fail_exhausted(self, token: bytes, items: list[PendingItem]) -> None:
        """Items tried in ATTEMPTS_MAX batches fail, unless the chain shows them paid (a batch
        of theirs, or someone else, used the nonce while the node was not answering well)."""
        try:
            used = await nonces_used(self._rpc, token, items)
            events = []
            for item, is_used in zip(items, used, strict=True):
                failed = PaymentEvent(
                    item.id,
                    "failed",
                    reason=reasons.UNEXPECTED_SETTLE,
                    message=f"not settled after {ATTEMPTS_MAX} batches",
                )
                if is_used:
                    failed = await settled_elsewhere(
                        self._rpc,
                        token,
                        item,
                        PaymentEvent(
                            item.id,
                            "failed",
                            reason=reasons.NONCE_USED,
                            message="authorization used or cancelled outside this engine",
                        ),
                    )
                events.append(failed)
        except (RpcUnavailable, RpcError) as exc:
            log.warning("%d exhausted items wait: the chain cannot be asked: %s", len(items), exc)
            await self._give_back(items, f"undecided: {exc}")
            return
        await self._recorder.events(list(zip(items, events, strict=True)))

    async def _give_back(self, items: list[PendingItem], message: str) -> None:
        await self._recorder.requeued(items, message)
        await trio.sleep(self.chain.poll_interval_ms / 1000)
        await self._requeue.send(items)

    def _calldata(self, token: bytes, items: list[PendingItem], simulate: bool = False) -> bytes:
        payments = [i.payment for i in items]
        if self.chain.mode == "compact":
            return codec.settle_calldata(
                token, payments, simulate=simulate, facilitator=self._upto_batcher
            )
        return codec.aggregate3_calldata(token, payments)

    def _aggregate3_limit(self, data: bytes, count: int) -> int:
        return 21_000 + codec.calldata_gas(data) + count * self.chain.aggregate3_gas_per_item_max

    def _aggregate3_parts(self, token: bytes, items: list[PendingItem]) -> list[list[PendingItem]]:
        """aggregate3 with simulation: pieces whose bounded limit fits the per-tx gas cap, so
        each is simulated under exactly the limit it will be sent with."""
        if self.chain.mode != "aggregate3" or not self.chain.simulate or len(items) <= 1:
            return [items]
        parts = [items]
        while any(
            len(p) > 1
            and self._aggregate3_limit(self._calldata(token, p), len(p)) > self.chain.gas_per_tx_max
            for p in parts
        ):
            parts = [half for p in parts for half in (p[: len(p) // 2], p[len(p) // 2 :]) if half]
        return parts

    def _target(self, items: list[PendingItem]) -> bytes:
        if items[0].payment.method == PERMIT2_UPTO:
            assert self._upto_batcher is not None, "upto payments are verified only with one"
            return self._upto_batcher
        return self._batcher if self.chain.mode == "compact" else self._aggregate_target

    async def _simulate(
        self, token: bytes, items: list[PendingItem]
    ) -> tuple[list[PendingItem], int | None]:
        """eth_call the batch; fail the items that would revert; return the rest (and, in
        compact mode, the gas the item calls used)."""
        sender = self._signers.signers[0].address
        data = self._calldata(token, items, simulate=True)
        per_item: list[tuple[bool, bytes]]  # (succeeds, revert data) per item
        sim_gas: int | None = None
        if self.chain.mode == "compact":
            try:
                await self._rpc.eth_call(self._target(items), data, sender)
                raise RpcUnavailable("simulate() returned instead of reverting")
            except RpcError as exc:
                revert = exc.revert_data
                decoded = None if revert is None else codec.decode_simulation(revert)
                if decoded is None:
                    raise
                per_item, sim_gas = decoded
        else:
            # Run under the limit the batch will be sent with: an item that runs out of gas
            # here fails here, instead of failing on chain.
            limit = self._aggregate3_limit(data, len(items))
            returned = await self._rpc.eth_call(self._aggregate_target, data, sender, gas=limit)
            per_item = codec.decode_aggregate3_result(returned)
            sim_gas = limit
            # A sub-call that "succeeds" against an account with no code returns nothing; the
            # token's transferWithAuthorization also returns nothing, so that cannot be told apart
            # here: the receipt's AuthorizationUsed log is the proof of settlement.
        if len(per_item) != len(items):
            raise RpcUnavailable("simulation returned a result per item count mismatch")
        keep: list[PendingItem] = []
        failures: dict[tuple[str, str], list[PendingItem]] = {}
        for item, (ok, revert) in zip(items, per_item, strict=True):
            if ok:
                keep.append(item)
            else:
                failures.setdefault(codec.failure_reason(revert), []).append(item)
        for (reason, message), failed in failures.items():
            self.dropped_in_simulation += len(failed)
            await self._fail(token, failed, reason, f"simulation: {message}")
        return keep, sim_gas

    async def _fail(
        self, token: bytes, items: list[PendingItem], reason: str, message: str
    ) -> None:
        """Record items as failed; those failed because their nonce is used are first looked
        up on chain: used by a transaction that paid them, they are settled."""
        events = [PaymentEvent(i.id, "failed", reason=reason, message=message) for i in items]
        if reason == reasons.NONCE_USED:
            events = [
                await settled_elsewhere(self._rpc, token, i, e)
                for i, e in zip(items, events, strict=True)
            ]
        await self._recorder.events(list(zip(items, events, strict=True)))
        self._handled.update(i.id for i in items)

    async def _send_sized(
        self, token: bytes, items: list[PendingItem], sim_gas: int | None = None
    ) -> None:
        signer = self._signers.next()
        if len(items) == 1 and self.chain.direct_single and codec.compact_fits(items[0].payment):
            await self._send_direct(signer, token, items[0])
            return
        data = self._calldata(token, items)
        target = self._target(items)
        if sim_gas is not None and self.chain.mode == "aggregate3":
            # Simulated under this bound (see _simulate); items dropped since only lower it.
            estimate = self._aggregate3_limit(data, len(items))
        elif sim_gas is not None:
            # Sized from the simulation (which ran the same item calls), not eth_estimateGas,
            # whose binary search re-executes the whole batch a dozen times or more. If this
            # is ever short, the batcher reverts the whole batch and the items are requeued.
            estimate = 21_000 + codec.calldata_gas(data) + sim_gas * 51 // 50 + SETTLE_OVERHEAD_GAS
        else:
            try:
                estimate = await self._rpc.estimate_gas(target, data, signer.address)
            except RpcError:
                if len(items) == 1:
                    raise
                estimate = self.chain.gas_per_tx_max + 1  # too big or reverting: split and see
            estimate = estimate * 5 // 4 + 20_000
        limit = min(estimate, self.chain.gas_per_tx_max)
        if estimate > self.chain.gas_per_tx_max and len(items) > 1:
            half = len(items) // 2
            share = None if sim_gas is None else sim_gas * half // len(items)
            rest = None if sim_gas is None else sim_gas - (share or 0)
            await self._send_sized(token, items[:half], share)
            await self._send_sized(token, items[half:], rest)
            return
        fees = await self._fees()
        if fees is None:
            await self._give_back(items, "base fee above max_fee_per_gas_wei")
            return
        upto = items[0].payment.method == PERMIT2_UPTO
        await self._sign_record_broadcast(
            signer, token, target, data, limit, fees, items, mode="upto" if upto else None
        )

    async def _send_direct(self, signer: Signer, token: bytes, item: PendingItem) -> None:
        """A batch of one costs less as the token's own transferWithAuthorization (no batch
        overhead); a revert at estimation is the item's failure, with the token's reason."""
        data = codec.transfer_calldata(item.payment)
        try:
            estimate = await self._rpc.estimate_gas(token, data, signer.address)
        except RpcError as exc:
            revert = exc.revert_data
            if revert is None:
                raise
            reason, message = codec.failure_reason(revert)
            await self._fail(token, [item], reason, f"estimate: {message}")
            return
        fees = await self._fees()
        if fees is None:
            await self._give_back([item], "base fee above max_fee_per_gas_wei")
            return
        limit = min(estimate * 5 // 4 + 10_000, self.chain.gas_per_tx_max)
        await self._sign_record_broadcast(
            signer, token, token, data, limit, fees, [item], mode="direct"
        )

    async def _fees(self) -> Fees | None:
        waited = 0.0
        while True:
            fees = choose_fees(
                await self._rpc.base_fee(),
                self.chain.priority_fee_wei,
                self.chain.max_fee_per_gas_wei,
            )
            if fees is not None or waited >= FEE_WAIT_MAX_S:
                return fees
            await trio.sleep(1.0)
            waited += 1.0

    async def _sign_record_broadcast(
        self,
        signer: Signer,
        token: bytes,
        target: bytes,
        data: bytes,
        gas_limit: int,
        fees: Fees,
        items: list[PendingItem],
        mode: str | None = None,
    ) -> None:
        await self._slots.acquire()
        signed = signer.sign(
            to=target,
            data=data,
            gas=gas_limit,
            max_fee_per_gas=fees.max_fee_per_gas,
            max_priority_fee_per_gas=fees.max_priority_fee_per_gas,
        )
        batch_id = await self._batch_ids.next()
        record = BatchRecord(
            id=batch_id,
            chain_id=self.chain.chain_id,
            mode=mode or self.chain.mode,
            signer=signer.address,
            account_nonce=signed.nonce,
            gas_limit=gas_limit,
            max_fee_per_gas=fees.max_fee_per_gas,
            tx_hash=signed.tx_hash,
            raw_tx=signed.raw,
            payment_ids=[i.id for i in items],
        )
        try:
            await self._recorder.batch_sent(record, items, signer.lease_epoch)
        except BaseException:
            signer.next_nonce = signed.nonce  # nothing was recorded or sent: reuse the nonce
            self._slots.release()
            raise
        # From here the batch is on record: the confirm stage owns it whatever the node says
        # (an error can come from a node, or a proxy, that took the transaction all the same).
        # Its only way out is the confirm stage's watch-and-reconcile; the slot goes with it.
        self._handled.update(i.id for i in items)
        inflight = InflightBatch(record, items, token, target, self._clock.now())
        try:
            await self._broadcast(signer, record, signed.raw, len(items))
        finally:
            with trio.CancelScope(shield=True):
                await self._confirm.send(inflight)

    async def _broadcast(self, signer: Signer, record: BatchRecord, raw: bytes, count: int) -> None:
        try:
            await self._rpc.send_raw(raw)
            log.info(
                "batch %d sent: %d items, nonce %d, gas limit %d, tx %s",
                record.id,
                count,
                record.account_nonce,
                record.gas_limit,
                record.tx_hash,
            )
        except RpcError as exc:
            log.warning("batch %d: node refused the transaction: %s", record.id, exc)
            if not _already_known(exc):
                # Perhaps rejected outright, perhaps taken all the same. If the node's pending
                # nonce says it is free, reuse it for the next batch; the confirm stage
                # rebroadcasts this one, or reconciles it once the nonce is spent.
                try:
                    pending = await self._rpc.nonce(signer.address)
                except (RpcError, RpcUnavailable) as nonce_exc:
                    log.warning("batch %d: account nonce unreadable (%s)", record.id, nonce_exc)
                else:
                    if pending == record.account_nonce and signer.next_nonce == (
                        record.account_nonce + 1
                    ):
                        signer.next_nonce = pending
        except RpcUnavailable as exc:
            # Unknown whether it arrived: the confirm stage rebroadcasts.
            log.warning("batch %d: broadcast unconfirmed (%s)", record.id, exc)


def _already_known(exc: RpcError) -> bool:
    text = exc.message.lower()
    return "already known" in text or "already imported" in text
