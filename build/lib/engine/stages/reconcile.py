"""Deciding a payment whose authorization nonce the chain reports used, from the chain.

Anyone may submit an EIP-3009 authorization: a front-runner, the payer's own wallet, another
facilitator. When someone did before our batch, the simulation (or the mined batch's
ItemFailed) says "authorization is used"; that alone does not say whether the payee was paid:
the payer may have signed a *different* authorization with the same nonce, or cancelled it.
The transaction that used the nonce decides: if it moved exactly this payment
(``Transfer(payer, payee, value)`` from the token), the payment is settled, by that transaction.
"""

from __future__ import annotations

from ..chain import codec
from ..chain.rpc import ChainClient, RpcUnavailable
from ..model import PaymentEvent, PendingItem

LOG_LOOKBACK_BLOCKS = 50_000


async def settled_elsewhere(
    rpc: ChainClient, token: bytes, item: PendingItem, failed: PaymentEvent
) -> PaymentEvent:
    """Decide a payment whose authorization nonce the chain reports used (simulation, a
    batch's ItemFailed, a dead batch): find the transaction that used it (the token's
    AuthorizationUsed log) and settle the payment if that transaction moved exactly this
    payment; a different authorization with the same nonce, or a cancellation, leaves it
    failed."""
    p = item.payment
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
