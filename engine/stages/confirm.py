"""The confirm stage (one per chain): watch sent batches until final, record every item.

Receipts of every hash a batch was sent under (the original and its fee-bumped replacements)
are polled in one JSON-RPC batch per interval. A mined batch is final after the configured
confirmations *and* once its block is still the canonical block at that height (a receipt from
a block that a reorganisation removed is not trusted: the batch is watched, and resent, until it
is mined again). Each item's outcome is read from the receipt's logs (the token's
AuthorizationUsed event proves settlement, the batcher's ItemFailed/CallFailed event carries a
failure's reason), never by re-running eth_call.

An item whose authorization was used by a transaction that is not ours (a front-runner, the
payer's wallet, another facilitator) is decided from that transaction: it moved exactly this
payment (``Transfer(payer, payee, value)``) and the payment is settled, or it did not and the
payment failed. A batch stuck under a base fee that rose past its fee cap is replaced (same
account nonce, higher fees, never above ``max_fee_per_gas_wei``). A batch whose account nonce
was consumed while none of its hashes has a receipt is dead: each of its items is reconciled
against the chain, so nothing is settled twice or dropped.

The decisions are pure functions (:func:`unseen_action`, :func:`outcome_events`); the stage does
the I/O through the narrow :class:`~engine.chain.rpc.ChainClient`.
"""

from __future__ import annotations

import contextlib
import enum
import logging

import msgspec
import trio

from ..chain import codec
from ..chain.rpc import ChainClient, RpcError, RpcUnavailable
from ..chain.signer import SignerPool, decode_raw
from ..clock import Clock, Wakeup
from ..config import ChainConfig
from ..model import BatchEvent, InflightBatch, PaymentEvent, PendingItem
from ..outcomes import Recorder
from ..rules import reasons
from ..rules.fees import bump_fees
from .reconcile import LOG_LOOKBACK_BLOCKS, nonces_used, settled_elsewhere

log = logging.getLogger("x402_engine.confirm")

DEAD_AFTER_BLOCKS = 2
__all__ = ["LOG_LOOKBACK_BLOCKS", "ConfirmStage", "Unseen", "split_evenly", "unseen_action"]


def split_evenly(total: int, parts: int) -> list[int]:
    """Split an integer total into ``parts`` integer shares that add up exactly."""
    assert parts > 0 and total >= 0
    share, rest = divmod(total, parts)
    return [share + (1 if i < rest else 0) for i in range(parts)]


class Unseen(enum.Enum):
    WAIT = "wait"
    REBROADCAST = "rebroadcast"
    DEAD = "dead"


def unseen_action(
    *,
    now: float,
    last_broadcast: float,
    rebroadcast_after_s: float,
    nonce_spent: bool,
    head: int | None,
    spent_first_seen: int | None,
    confirmations: int,
) -> Unseen:
    """What to do with a batch none of whose hashes has a receipt (pure).

    Dead only when its account nonce was spent by another transaction and its own receipt is
    still missing ``DEAD_AFTER_BLOCKS`` (plus the confirmations) blocks later: a node may
    update the account nonce before it serves the receipt."""
    if nonce_spent:
        if head is None or spent_first_seen is None:
            return Unseen.WAIT
        if head - spent_first_seen >= DEAD_AFTER_BLOCKS + confirmations:
            return Unseen.DEAD
        return Unseen.WAIT
    if now - last_broadcast >= rebroadcast_after_s:
        return Unseen.REBROADCAST
    return Unseen.WAIT


class ConfirmStatistics(msgspec.Struct, frozen=True):
    inflight: int  # batches sent and not yet final
    replacements_sent: int  # fee-bumped replacements
    reorged_receipts: int  # receipts found no longer canonical
    polls: int  # receipt polls completed


class ConfirmStage:
    def __init__(
        self,
        chain: ChainConfig,
        rpc: ChainClient,
        recorder: Recorder,
        clock: Clock,
        slots: trio.Semaphore,
        requeue: trio.MemorySendChannel[list[PendingItem]],
        signers: SignerPool | None = None,
    ) -> None:
        self.chain = chain
        self._rpc = rpc
        self._recorder = recorder
        self._clock = clock
        self._slots = slots
        self._requeue = requeue
        self._signers = signers
        self._inflight: dict[int, InflightBatch] = {}
        self._last_broadcast: dict[int, float] = {}
        self._nonce_spent_at: dict[int, int] = {}  # batch id -> head when first seen spent
        self._arrived = Wakeup()
        self._batcher = chain.batcher_address
        self.replacements_sent = 0
        self.reorged_receipts = 0
        self._polls = 0

    def inflight(self) -> int:
        return len(self._inflight)

    def statistics(self) -> ConfirmStatistics:
        return ConfirmStatistics(
            len(self._inflight), self.replacements_sent, self.reorged_receipts, self._polls
        )

    def watched_item_ids(self) -> set[int]:
        """Ids of the payments in batches this stage watches."""
        return {i.id for b in self._inflight.values() for i in b.items}

    def adopt(self, batch: InflightBatch) -> None:
        """Watch a batch recovered from the ledger (its slot is taken here)."""
        self._inflight[batch.record.id] = batch
        self._last_broadcast[batch.record.id] = batch.sent_at

    async def run(self, receive: trio.MemoryReceiveChannel[InflightBatch]) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._take, receive)
            await self._poll_forever()

    async def _take(self, receive: trio.MemoryReceiveChannel[InflightBatch]) -> None:
        async with receive:
            async for batch in receive:
                self._inflight[batch.record.id] = batch
                self._last_broadcast[batch.record.id] = batch.sent_at
                self._arrived.set()

    async def _poll_forever(self) -> None:
        interval = self.chain.poll_interval_ms / 1000
        async with self._requeue:
            while True:
                if not self._inflight:
                    await self._arrived.wait()
                await trio.sleep(interval)
                try:
                    await self.poll_once()
                except (RpcUnavailable, RpcError) as exc:
                    log.info("confirm: node trouble, looking again: %s", exc)
                    await trio.sleep(interval)  # keep the batches, look again

    async def poll_once(self) -> None:
        batches = list(self._inflight.values())
        if not batches:
            return
        hashes = [h for b in batches for h in b.hashes()]
        found = dict(zip(hashes, await self._rpc.receipts(hashes), strict=True))
        head: int | None = None
        canonical: dict[int, str | None] = {}
        unseen: list[InflightBatch] = []
        for batch in batches:
            receipt = next((found[h] for h in batch.hashes() if found[h] is not None), None)
            if receipt is None:
                unseen.append(batch)
                continue
            if head is None:
                head = await self._rpc.block_number()
            block = int(receipt.block_number, 16)
            if head - block + 1 < self.chain.confirmations:
                continue
            if block not in canonical:
                canonical[block] = await self._rpc.block_hash(block)
            if (canonical[block] or "").lower() != receipt.block_hash.lower():
                # Its block left the canonical chain: not mined after all. Watch it (and resend
                # it) until a receipt from the canonical chain says otherwise.
                self.reorged_receipts += 1
                log.warning(
                    "batch %d: receipt from block %d (%s) is no longer canonical; watching again",
                    batch.record.id,
                    block,
                    receipt.block_hash,
                )
                unseen.append(batch)
                continue
            await self._finalize(batch, receipt)
        if unseen:
            await self._check_unseen(unseen)
        self._polls += 1

    async def _finalize(self, batch: InflightBatch, receipt: codec.Receipt) -> None:
        record = batch.record
        gas_used = int(receipt.gas_used, 16)
        price = int(receipt.effective_gas_price, 16)
        block = int(receipt.block_number, 16)
        requeue: list[PendingItem] = []
        if int(receipt.status, 16) != 1:
            # The whole transaction reverted (e.g. out of gas): nothing moved, so every item
            # goes back to the pool for another batch.
            message = f"batch {record.id} reverted"
            pairs = [
                (item, PaymentEvent(item.id, "accepted", message=message)) for item in batch.items
            ]
            requeue = list(batch.items)
            state = "reverted"
        else:
            pairs = await self._item_events(batch, receipt)
            state = "mined"
        event = BatchEvent(record.id, state, receipt.transaction_hash, block, gas_used, price)
        await self._recorder.batch_final(event, pairs)
        log.info(
            "batch %d %s in block %d: %d items, gas %d",
            record.id,
            event.state,
            block,
            len(batch.items),
            gas_used,
        )
        self._forget(record.id)
        if requeue:
            await self._requeue.send(requeue)

    async def _item_events(
        self, batch: InflightBatch, receipt: codec.Receipt
    ) -> list[tuple[PendingItem, PaymentEvent]]:
        """Each item's final event from a mined batch's receipt, with its share of the gas."""
        gas_used = int(receipt.gas_used, 16)
        price = int(receipt.effective_gas_price, 16)
        # Failure events come from the batcher (compact), the aggregate3 target, or nobody
        # (direct: a failing direct transfer reverts the whole transaction instead).
        outcomes = codec.item_outcomes(
            receipt,
            self._batcher if batch.record.mode == "compact" else batch.target,
            batch.token,
            [i.payment for i in batch.items],
        )
        pairs: list[tuple[PendingItem, PaymentEvent]] = []
        gas_shares = split_evenly(gas_used, len(batch.items))
        for item, outcome, gas in zip(batch.items, outcomes, gas_shares, strict=True):
            event = PaymentEvent(
                item.id,
                "settled",
                batch_id=batch.record.id,
                tx_hash=receipt.transaction_hash,
                block_number=int(receipt.block_number, 16),
                gas_used=gas,
                fee_wei=gas * price,
            )
            if outcome.status is codec.ItemStatus.FAILED:
                event = _as_failed(event, outcome.reason, outcome.message)
                if outcome.reason == reasons.NONCE_USED:
                    # Used by whom? If by a transaction that paid this payment, it is paid.
                    event = await self._decide_used(batch.token, item, event)
            elif outcome.status is not codec.ItemStatus.SETTLED:
                event = _as_failed(
                    event,
                    reasons.UNEXPECTED_SETTLE,
                    "no AuthorizationUsed log for this item in the batch receipt",
                )
            pairs.append((item, event))
        return pairs

    def _forget(self, batch_id: int) -> None:
        self._inflight.pop(batch_id, None)
        self._last_broadcast.pop(batch_id, None)
        self._nonce_spent_at.pop(batch_id, None)
        self._slots.release()

    async def _check_unseen(self, unseen: list[InflightBatch]) -> None:
        """Batches without a (canonical) receipt: rebroadcast now and then, replace one stuck
        under a risen base fee, reconcile one whose nonce another transaction spent."""
        now = self._clock.now()
        latest_nonce: dict[str, int] = {}
        head: int | None = None
        base_fee: int | None = None
        for batch in unseen:
            rid = batch.record.id
            signer = batch.record.signer
            if signer not in latest_nonce:
                latest_nonce[signer] = await self._rpc.nonce(signer, "latest")
            spent = latest_nonce[signer] > batch.record.account_nonce
            if spent:
                if head is None:
                    head = await self._rpc.block_number()
                self._nonce_spent_at.setdefault(rid, head)
            else:
                self._nonce_spent_at.pop(rid, None)
            action = unseen_action(
                now=now,
                last_broadcast=self._last_broadcast.get(rid, 0.0),
                rebroadcast_after_s=self.chain.rebroadcast_after_s,
                nonce_spent=spent,
                head=head,
                spent_first_seen=self._nonce_spent_at.get(rid),
                confirmations=self.chain.confirmations,
            )
            if action is Unseen.DEAD:
                log.warning(
                    "batch %d: nonce %d spent by another transaction, no receipt for %s;"
                    " reconciling its %d items against the chain",
                    rid,
                    batch.record.account_nonce,
                    batch.hashes(),
                    len(batch.items),
                )
                await self._reconcile_dead(batch)
            elif action is Unseen.REBROADCAST:
                self._last_broadcast[rid] = now
                if base_fee is None:
                    base_fee = await self._rpc.base_fee()
                if not await self._replace_if_stuck(batch, base_fee):
                    log.info("batch %d: no receipt yet, rebroadcasting", rid)
                    # "already known" / "nonce too low" are expected: the next poll tells.
                    with contextlib.suppress(RpcError):
                        await self._rpc.send_raw(batch.latest_raw())

    async def _replace_if_stuck(self, batch: InflightBatch, base_fee: int) -> bool:
        """Replace a batch priced under the current base fee (same nonce, higher fees, capped);
        True if a replacement was recorded and sent."""
        signer = None if self._signers is None else self._signers.by_address(batch.record.signer)
        if signer is None:
            return False
        current = decode_raw(batch.latest_raw()).fees
        fees = bump_fees(
            current, base_fee, self.chain.priority_fee_wei, self.chain.max_fee_per_gas_wei
        )
        if fees is None:
            if current.max_fee_per_gas < base_fee + current.max_priority_fee_per_gas:
                log.warning(
                    "batch %d: stuck under base fee %d, and max_fee_per_gas_wei %d leaves no"
                    " room to replace it; waiting",
                    batch.record.id,
                    base_fee,
                    self.chain.max_fee_per_gas_wei,
                )
            return False
        signed = signer.replace(batch.latest_raw(), fees)
        await self._recorder.replacement(batch.record.id, signed.tx_hash, signed.raw)
        batch.replacements.append((signed.tx_hash, signed.raw))
        self.replacements_sent += 1
        log.warning(
            "batch %d: base fee %d above its fee cap %d; replaced by %s at max fee %d",
            batch.record.id,
            base_fee,
            current.max_fee_per_gas,
            signed.tx_hash,
            fees.max_fee_per_gas,
        )
        with contextlib.suppress(RpcError):
            await self._rpc.send_raw(signed.raw)
        return True

    async def _reconcile_dead(self, batch: InflightBatch) -> None:
        """Decide each item of a batch that will never be mined from the chain's own state."""
        items = batch.items
        token = batch.token
        used = await nonces_used(self._rpc, token, items)
        pairs: list[tuple[PendingItem, PaymentEvent]] = []
        requeue: list[PendingItem] = []
        for item, is_used in zip(items, used, strict=True):
            if not is_used:
                requeue.append(item)
                pairs.append(
                    (item, PaymentEvent(item.id, "accepted", message="batch dropped; requeued"))
                )
                continue
            failed = PaymentEvent(
                item.id,
                "failed",
                reason=reasons.NONCE_USED,
                message="authorization used or cancelled outside this engine",
            )
            pairs.append((item, await self._decide_used(token, item, failed)))
        event = BatchEvent(
            batch.record.id, "dead", batch.record.tx_hash, message="nonce consumed by another tx"
        )
        await self._recorder.batch_final(event, pairs)
        self._forget(batch.record.id)
        if requeue:
            await self._requeue.send(requeue)

    async def _decide_used(
        self, token: bytes, item: PendingItem, failed: PaymentEvent
    ) -> PaymentEvent:
        """An item whose nonce is used: settled if the transaction that used it moved exactly
        this payment (Transfer payer -> payee, value), else ``failed`` as given."""
        return await settled_elsewhere(self._rpc, token, item, failed)


def _as_failed(event: PaymentEvent, reason: str | None, message: str | None) -> PaymentEvent:
    return PaymentEvent(
        event.payment_id,
        "failed",
        batch_id=event.batch_id,
        tx_hash=event.tx_hash,
        block_number=event.block_number,
        gas_used=event.gas_used,
        fee_wei=event.fee_wei,
        reason=reason,
        message=message,
    )
