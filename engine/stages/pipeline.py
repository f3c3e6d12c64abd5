"""One chain's settlement pipeline: batch ──► submit ──► confirm, joined by bounded trio memory
channels, with the chain's readers for /verify (chain state) and credit control.

Requeued items come from batches that hold an in-flight slot, so that channel is bounded by the
slots; the confirm channel by the slots too.
"""

from __future__ import annotations

import msgspec
import trio

from ..chain.rpc import ChainClient
from ..chain.signer import SignerPool
from ..clock import Clock
from ..config import ChainConfig, EngineConfig
from ..model import Batch, InflightBatch, PendingItem
from ..outcomes import Recorder
from ..rules.credit import CreditBook
from ..rules.policy import BatchPolicy, Limits, schedule_policy
from .batch import BatchStage
from .chainstate import ChainStateReader
from .confirm import ConfirmStage
from .credit_control import BalanceReader, ChainCredit
from .signatures import SignatureReader
from .submit import BatchIds, SubmitStage


class SettlementStatistics(msgspec.Struct, frozen=True):
    """A snapshot of one chain's settlement."""

    free_slots: int
    slots: int
    inflight: int
    replacements: int
    reorged_receipts: int
    queued: int = 0  # payments waiting for a batch
    blocked_since: float | None = None  # a planned batch waiting for the submit stage
    receipt_polls: int = 0  # completed polls of the confirm stage


class ChainPipeline:
    """One chain's stages (batch, submit, confirm) and the bounded channels between them, with
    the chain's readers for /verify and credit control."""

    def __init__(
        self,
        config: ChainConfig,
        engine_config: EngineConfig,
        rpc: ChainClient,
        signers: SignerPool,
        recorder: Recorder,
        clock: Clock,
        batch_ids: BatchIds,
        adopted: int,
        policy: BatchPolicy,
    ) -> None:
        cap = engine_config.channel_capacity
        self.config = config
        self.rpc = rpc
        self.signers = signers
        self.slots = trio.Semaphore(max(0, config.max_inflight_batches - adopted))
        self.new_send, self.new_recv = trio.open_memory_channel[list[PendingItem]](cap)
        # Requeued items come from batches holding an in-flight slot: bounded by the slots.
        requeue_cap = 2 * (config.max_inflight_batches + adopted) + 2
        self.requeue_send, self.requeue_recv = trio.open_memory_channel[list[PendingItem]](
            requeue_cap
        )
        self.batch_send, self.batch_recv = trio.open_memory_channel[Batch](2)
        self.confirm_send, self.confirm_recv = trio.open_memory_channel[InflightBatch](
            config.max_inflight_batches + 1
        )
        policy_cfg = engine_config.policy
        limits = Limits(
            max_batch_size=policy_cfg.max_batch_size,
            gas_per_tx_max=config.gas_per_tx_max,
            block_gas_limit=config.block_gas_limit,
            gas_per_item_estimate=config.gas_per_item_estimate,
            deadline_margin_s=policy_cfg.deadline_margin_s,
        )
        self.batch = BatchStage(
            config.chain_id,
            policy,
            limits,
            clock,
            self.batch_send,
            payee_policies={
                p.payee_address: schedule_policy(p, policy_cfg.max_wait_ms / 1000)
                for p in policy_cfg.payees
            },
        )
        self.submit = SubmitStage(
            config,
            rpc,
            signers,
            recorder,
            clock,
            batch_ids,
            self.slots,
            self.requeue_send.clone(),
            self.confirm_send,
        )
        self.confirm = ConfirmStage(
            config, rpc, recorder, clock, self.slots, self.requeue_send, signers
        )
        self.credit, self.state = self._readers(engine_config, clock)
        self.signatures = SignatureReader(
            rpc,
            window_s=engine_config.ingest.state_window_ms / 1000,
            batch_max=engine_config.ingest.state_batch_max,
        )

    def _readers(
        self, engine_config: EngineConfig, clock: Clock
    ) -> tuple[ChainCredit, ChainStateReader]:
        """The chain's readers for credit control (balances) and /verify (nonce state)."""
        credit = engine_config.credit
        ingest = engine_config.ingest
        target = self.config.aggregate3_target
        return (
            ChainCredit(
                CreditBook(credit.balance_max_age_s, credit.payer_cap),
                BalanceReader(self.rpc, target),
                clock,
                credit.refresh_s,
                self.batch.expedite,
            ),
            ChainStateReader(
                self.rpc,
                target,
                clock,
                max_age_s=ingest.state_max_age_ms / 1000,
                window_s=ingest.state_window_ms / 1000,
                batch_max=ingest.state_batch_max,
            ),
        )

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.batch.run, self.new_recv, self.requeue_recv)
            nursery.start_soon(self.submit.run, self.batch_recv)
            nursery.start_soon(self.confirm.run, self.confirm_recv)
            nursery.start_soon(self.credit.run)
            nursery.start_soon(self.state.run)
            nursery.start_soon(self.signatures.run)

    def statistics(self) -> SettlementStatistics:
        confirm = self.confirm.statistics()
        return SettlementStatistics(
            free_slots=self.slots.value,
            slots=self.config.max_inflight_batches,
            inflight=confirm.inflight,
            replacements=confirm.replacements_sent,
            reorged_receipts=confirm.reorged_receipts,
            queued=self.batch.depth(),
            blocked_since=self.batch.blocked_since,
            receipt_polls=confirm.polls,
        )
