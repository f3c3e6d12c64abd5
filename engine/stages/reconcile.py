"""Deciding a payment whose authorization nonce the chain reports used, from the chain.

Anyone may submit an EIP-3009 authorization: a front-runner, the payer's own wallet, another
facilitator. When someone did before our batch, the simulation (or the mined batch's
ItemFailed) says "authorization is used"; that alone does not say whether the payee was paid:
the payer may have signed a *different* authorization with the same nonce, or cancelled it.
The transaction that used the nonce decides: if it moved exactly this payment
(``Transfer(payer, payee, value)`` from the token), the payment is settled, by that transaction.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..chain import codec, permit2
from ..chain.rpc import ChainClient, RpcError, RpcUnavailable
from ..model import EIP3009, PERMIT2, PaymentEvent, PendingItem
from ..rules import reasons

LOG_LOOKBACK_BLOCKS = 50_000


async def nonces_used(rpc: ChainClient, token: bytes, items: Sequence[PendingItem]) -> list[bool]:
    """Whether each item's nonce is used or cancelled on chain: ``authorizationState`` for
    EIP-3009, Permit2's ``nonceBitmap`` bit for Permit2 payments."""
    plain = [i for i in items if i.payment.method == EIP3009]
    states = (
        await rpc.authorization_states(token, [(i.payment.payer, i.payment.nonce) for i in plain])
        if plain
        else []
    )
    used = dict(zip((i.id for i in plain), states, strict=True))
    for item in items:
        if item.payment.method != EIP3009:
            p = item.payment
            word = await rpc.eth_call(PERMIT2, permit2.nonce_bitmap_calldata(p.payer, p.nonce))
            if len(word) < 32:
                raise RpcError(-32000, "Permit2 answered no nonceBitmap word (no code there?)")
            used[item.id] = permit2.nonce_used(p.nonce, word)
    return [used[i.id] for i in items]


async def settled_elsewhere(
    rpc: ChainClient, token: bytes, item: PendingItem, failed: PaymentEvent
) -> PaymentEvent:
    """Decide a payment whose authorization nonce the chain reports used (simulation, a
    batch's ItemFailed, a dead batch): find the transaction that used it (the token's
    AuthorizationUsed log) and settle the payment if that transaction moved exactly this
    payment; a different authorization with the same nonce, or a cancellation, leaves it
    failed."""
    p = item.payment
    if p.method != EIP3009:
        # Permit2 logs nothing per nonce, so the transaction that used it cannot be found: a
        # Transfer alike could be another payment between the same parties. Failed, and said.
        return PaymentEvent(
            failed.payment_id,
            "failed",
            reason=reasons.PERMIT2_NONCE_USED,
            message="the Permit2 nonce was used outside this engine's batches (by the payer,"
            " or another submitter); whether that paid the payee is not in Permit2's logs",
        )
    head = await rpc.block_number()
    tx_hash = await rpc.authorization_used_in(token, p.payer, p.nonce, head - LOG_LOOKBACK_BLOCKS)
    if tx_hash is None:
        return failed  # cancelled, or used beyond the look-back
    [receipt] = await rpc.receipts([tx_hash])
    if receipt is None:
        # The node logged the use but cannot show the transaction (lagging, or mid-reorg):
        # undecided, not failed. The caller keeps the payment and asks again.
        raise RpcUnavailable(f"receipt of {tx_hash}, which used payment {item.id}'s nonce")
    if not codec.transfer_in_receipt(receipt, token, p.payer, p.payee, p.value):
        return failed
    return PaymentEvent(
        item.id,
        "settled",
        tx_hash=receipt.transaction_hash,
        block_number=int(receipt.block_number, 16),
        message="settled by another transaction",
    )
