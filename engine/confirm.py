"""The confirm stage (one per chain): watch sent batches until final, record every item.

Receipts are polled in one JSON-RPC batch per interval. A mined batch is final after the
configured confirmations; each item's outcome is read from the receipt's logs (the token's
AuthorizationUsed event proves settlement, the batcher's ItemFailed/CallFailed event carries a
failure's reason), never by re-running eth_call. A batch whose account nonce was consumed by
another transaction without its own receipt appearing is dead: each of its items is reconciled
against the chain (``authorizationState`` and the AuthorizationUsed log), so nothing is settled
twice or dropped.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import msgspec
import trio

from . import codec, reasons
from .clock import Clock
from .config import ChainConfig
from .ledger import BatchEvent, PaymentEvent
from .outcomes import Recorder
from .policy import PendingItem
from .rpc import Rpc, RpcError, RpcUnavailable
from .submit import InflightBatch

log = logging.getLogger("x402_engine.confirm")

DEAD_AFTER_BLOCKS = 2
LOG_LOOKBACK_BLOCKS = 50_000


def split_evenly(total: int, parts: int) -> list[int]:
    """Split an integer total into ``parts`` integer shares that add up exactly."""
    assert parts > 0 and total >= 0
    share, rest = divmod(total, parts)
    return [share + (1 if i < rest else 0) for i in range(parts)]


class ConfirmStage:
    def __init__(
        self,
        chain: ChainConfig,
        rpc: Rpc,
        recorder: Recorder,
        clock: Clock,
        slots: trio.Semaphore,
        requeue: trio.MemorySendChannel[list[PendingItem]],
    ) -> None:
        self.chain = chain
        self._rpc = rpc
        self._recorder = recorder
        self._clock = clock
        self._slots = slots
        self._requeue = requeue
        self._inflight: dict[int, InflightBatch] = {}
        self._last_broadcast: dict[int, float] = {}
        self._nonce_spent_at: dict[int, int] = {}  # batch id -> head when first seen spent
        self._arrived = trio.Event()
        self._batcher = bytes.fromhex(chain.batcher[2:])

    def inflight(self) -> int:
        return len(self._inflight)

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
                    self._arrived = trio.Event()
                    await self._arrived.wait()
                await trio.sleep(interval)
                try:
                    await self.poll_once()
                except (RpcUnavailable, RpcError):
                    await trio.sleep(interval)  # node trouble: keep the batches, look again

    async def poll_once(self) -> None:
        batches = list(self._inflight.values())
        if not batches:
            return
        receipts = await self._rpc.receipts([b.record.tx_hash for b in batches])
        head: int | None = None
        unseen: list[InflightBatch] = []
        for batch, receipt in zip(batches, receipts, strict=True):
            if receipt is None:
                unseen.append(batch)
                continue
            if head is None:
                head = await self._rpc.block_number()
            if head - int(receipt.block_number, 16) + 1 >= self.chain.confirmations:
                await self._finalize(batch, receipt)
        if unseen:
            await self._check_unseen(unseen)

    async def _finalize(self, batch: InflightBatch, receipt: codec.Receipt) -> None:
        record = batch.record
        gas_used = int(receipt.gas_used, 16)
        price = int(receipt.effective_gas_price, 16)
        block = int(receipt.block_number, 16)
        items = batch.items
        pairs: list[tuple[PendingItem, PaymentEvent]] = []
        requeue: list[PendingItem] = []
        if int(receipt.status, 16) != 1:
            # The whole transaction reverted (e.g. out of gas): nothing moved, so every item
            # goes back to the pool for another batch.
            for item in items:
                pairs.append(
                    (item, PaymentEvent(item.id, "accepted", message=f"batch {record.id} reverted"))
                )
                requeue.append(item)
            event = BatchEvent(
                record.id, "reverted", receipt.transaction_hash, block, gas_used, price
            )
        else:
            # Failure events come from the batcher (compact), the aggregate3 target, or nobody
            # (direct: a failing direct transfer reverts the whole transaction instead).
            outcomes = codec.item_outcomes(
                receipt,
                self._batcher if record.mode == "compact" else batch.target,
                batch.token,
                [i.payment for i in items],
            )
            gas_shares = split_evenly(gas_used, len(items))
            for item, outcome, gas in zip(items, outcomes, gas_shares, strict=True):
                common = {
                    "batch_id": record.id,
                    "tx_hash": receipt.transaction_hash,
                    "block_number": block,
                    "gas_used": gas,
                    "fee_wei": gas * price,
                }
                if outcome.status is codec.ItemStatus.SETTLED:
                    ev = PaymentEvent(item.id, "settled", **common)  # type: ignore[arg-type]
                elif outcome.status is codec.ItemStatus.FAILED:
                    ev = PaymentEvent(
                        item.id,
                        "failed",
                        reason=outcome.reason,
                        message=outcome.message,
                        **common,  # type: ignore[arg-type]
                    )
                else:
                    ev = PaymentEvent(
                        item.id,
                        "failed",
                        reason=reasons.UNEXPECTED_SETTLE,
                        message="no AuthorizationUsed log for this item in the batch receipt",
                        **common,  # type: ignore[arg-type]
                    )
                pairs.append((item, ev))
            event = BatchEvent(record.id, "mined", receipt.transaction_hash, block, gas_used, price)
        await self._recorder.batch_final(event, pairs)
        log.info(
            "batch %d %s in block %d: %d items, gas %d",
            record.id,
            event.state,
            block,
            len(items),
            gas_used,
        )
        self._forget(record.id)
        if requeue:
            await self._requeue.send(requeue)

    def _forget(self, batch_id: int) -> None:
        self._inflight.pop(batch_id, None)
        self._last_broadcast.pop(batch_id, None)
        self._nonce_spent_at.pop(batch_id, None)
        self._slots.release()

    async def _check_unseen(self, unseen: list[InflightBatch]) -> None:
        """Batches without a receipt: rebroadcast now and then; declare one dead only when its
        account nonce has been spent by another transaction and its own receipt is still
        missing ``DEAD_AFTER_BLOCKS`` blocks later (a node may update the account nonce before
        it serves the receipt)."""
        now = self._clock.now()
        latest_nonce: dict[str, int] = {}
        head: int | None = None
        for batch in unseen:
            rid = batch.record.id
            signer = batch.record.signer
            if signer not in latest_nonce:
                latest_nonce[signer] = await self._rpc.nonce(signer, "latest")
            if latest_nonce[signer] > batch.record.account_nonce:
                if head is None:
                    head = await self._rpc.block_number()
                first_seen = self._nonce_spent_at.setdefault(rid, head)
                if head - first_seen >= DEAD_AFTER_BLOCKS + self.chain.confirmations:
                    log.warning(
                        "batch %d: nonce %d spent by another transaction, no receipt for %s;"
                        " reconciling its %d items against the chain",
                        rid,
                        batch.record.account_nonce,
                        batch.record.tx_hash,
                        len(batch.items),
                    )
                    await self._reconcile_dead(batch)
                continue
            self._nonce_spent_at.pop(rid, None)
            last = self._last_broadcast.get(rid, 0.0)
            if now - last >= self.chain.rebroadcast_after_s:
                self._last_broadcast[rid] = now
                log.info("batch %d: no receipt after %.0f s, rebroadcasting", rid, now - last)
                # "already known" / "nonce too low" are expected: the next poll tells.
                with contextlib.suppress(RpcError):
                    await self._rpc.send_raw(batch.record.raw_tx)

    async def _reconcile_dead(self, batch: InflightBatch) -> None:
        """Decide each item of a batch that will never be mined from the chain's own state."""
        items = batch.items
        token = batch.token
        results = await self._rpc.batch(
            [
                (
                    "eth_call",
                    [
                        {
                            "to": "0x" + token.hex(),
                            "data": "0x"
                            + codec.authorization_state_calldata(
                                i.payment.payer, i.payment.nonce
                            ).hex(),
                        },
                        "latest",
                    ],
                )
                for i in items
            ]
        )
        pairs: list[tuple[PendingItem, PaymentEvent]] = []
        requeue: list[PendingItem] = []
        for item, result in zip(items, results, strict=True):
            if isinstance(result, RpcError):
                raise result
            used = int(result, 16) != 0
            if not used:
                requeue.append(item)
                pairs.append(
                    (item, PaymentEvent(item.id, "accepted", message="batch dropped; requeued"))
                )
                continue
            found = await self._find_settlement(token, item)
            if found is not None:
                tx_hash, block = found
                pairs.append(
                    (
                        item,
                        PaymentEvent(
                            item.id,
                            "settled",
                            tx_hash=tx_hash,
                            block_number=block,
                            message="settled by another transaction",
                        ),
                    )
                )
            else:
                pairs.append(
                    (
                        item,
                        PaymentEvent(
                            item.id,
                            "failed",
                            reason=reasons.NONCE_USED,
                            message="authorization used or cancelled outside this engine",
                        ),
                    )
                )
        event = BatchEvent(
            batch.record.id, "dead", batch.record.tx_hash, message="nonce consumed by another tx"
        )
        await self._recorder.batch_final(event, pairs)
        self._forget(batch.record.id)
        if requeue:
            await self._requeue.send(requeue)

    async def _find_settlement(self, token: bytes, item: PendingItem) -> tuple[str, int] | None:
        head = await self._rpc.block_number()
        logs = await self._rpc.call(
            "eth_getLogs",
            [
                {
                    "address": "0x" + token.hex(),
                    "fromBlock": hex(max(0, head - LOG_LOOKBACK_BLOCKS)),
                    "toBlock": "latest",
                    "topics": [
                        "0x" + codec.AUTHORIZATION_USED.hex(),
                        "0x" + bytes(12).hex() + item.payment.payer.hex(),
                        "0x" + item.payment.nonce.hex(),
                    ],
                }
            ],
        )
        for entry in msgspec.convert(logs, list[dict[str, Any]]):
            return str(entry["transactionHash"]), int(entry["blockNumber"], 16)
        return None
