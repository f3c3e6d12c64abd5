"""Typed records: the x402 wire formats (decoded straight from JSON bytes with msgspec) and the
engine's own normalized payment.

Wire Structs keep every authorization field a string, as the spec sends them; the engine's
:class:`Payment` holds integers in the token's base units and 20/32-byte values as bytes, so
nothing downstream parses text again.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

# ---------------------------------------------------------------- wire formats (x402 v1, v2)


class WireAuthorization(msgspec.Struct, rename="camel"):
    from_: str = msgspec.field(name="from")
    to: str = ""
    value: str = ""
    valid_after: str = ""
    valid_before: str = ""
    nonce: str = ""


class WirePermitted(msgspec.Struct):
    token: str = ""
    amount: str = ""


class WireWitness(msgspec.Struct, rename="camel"):
    to: str = ""
    valid_after: str = ""
    facilitator: str | None = None  # `upto` only


class WirePermit2Authorization(msgspec.Struct):
    """A Permit2 ``PermitWitnessTransferFrom`` as the x402 ``exact``/``upto`` Permit2 payloads
    send it (``nonce`` and ``deadline`` decimal strings)."""

    from_: str = msgspec.field(name="from", default="")
    permitted: WirePermitted = msgspec.field(default_factory=WirePermitted)
    spender: str = ""
    nonce: str = ""
    deadline: str = ""
    witness: WireWitness = msgspec.field(default_factory=WireWitness)


class ExactEvmPayload(msgspec.Struct, rename="camel", omit_defaults=True):
    """The EVM payload: an EIP-3009 ``authorization`` or a ``permit2Authorization``."""

    signature: str
    authorization: WireAuthorization | None = None
    permit2_authorization: WirePermit2Authorization | None = None

    @property
    def eip3009(self) -> WireAuthorization:
        """The EIP-3009 authorization; ValueError for a Permit2 payload."""
        if self.authorization is None:
            raise ValueError("not an EIP-3009 payload (no authorization)")
        return self.authorization

    @property
    def payer_text(self) -> str:
        """The claimed payer (``from``) as sent, "" when absent."""
        if self.authorization is not None:
            return self.authorization.from_
        if self.permit2_authorization is not None:
            return self.permit2_authorization.from_
        return ""


class RequirementsV1(msgspec.Struct, rename="camel", omit_defaults=True):
    scheme: str
    network: str
    max_amount_required: str
    asset: str
    pay_to: str
    resource: str = ""
    description: str = ""
    mime_type: str = ""
    output_schema: Any = None
    max_timeout_seconds: int = 60
    extra: dict[str, Any] | None = None


class RequirementsV2(msgspec.Struct, rename="camel", omit_defaults=True):
    scheme: str
    network: str
    amount: str
    asset: str
    pay_to: str
    max_timeout_seconds: int = 60
    extra: dict[str, Any] | None = None


class PaymentPayloadV1(msgspec.Struct, tag_field="x402Version", tag=1):
    scheme: str
    network: str
    payload: ExactEvmPayload


class PaymentPayloadV2(msgspec.Struct, tag_field="x402Version", tag=2, omit_defaults=True):
    accepted: RequirementsV2
    payload: ExactEvmPayload
    resource: Any = None
    extensions: Any = None


PaymentPayload = PaymentPayloadV1 | PaymentPayloadV2
PaymentRequirements = RequirementsV1 | RequirementsV2

# ---------------------------------------------------------------- the engine's records

State = Literal["accepted", "submitted", "settled", "failed"]

# How a payment moves the tokens (Payment.method).
EIP3009 = 0  # the token's transferWithAuthorization
PERMIT2_EXACT = 1  # Permit2 permitWitnessTransferFrom through the x402 exact proxy
PERMIT2_UPTO = 2  # the same through the x402 upto proxy: any amount up to the permitted one
METHOD_NAMES = {EIP3009: "eip3009", PERMIT2_EXACT: "permit2", PERMIT2_UPTO: "upto"}
# Permit2 and the x402 proxies are at these addresses on every chain (CREATE2).
PERMIT2 = bytes.fromhex("000000000022D473030F116dDEE9F6B43aC78BA3")
EXACT_PERMIT2_PROXY = bytes.fromhex("402085c248EeA27D92E8b30b2C58ed07f9E20001")
UPTO_PERMIT2_PROXY = bytes.fromhex("4020A4f3b7b90ccA423B9fabCc0CE57C6C240002")
FINAL_STATES: frozenset[str] = frozenset({"settled", "failed"})


class Payment(msgspec.Struct, frozen=True, gc=False):
    """A verified payment authorization, normalized: integers and raw bytes.

    EIP-3009 (``method`` 0): the fields are the authorization's. Permit2 (``method`` 1, 2):
    ``payee`` and ``valid_after`` are the witness's, ``valid_before`` the permit's deadline,
    ``nonce`` its uint256 nonce (32 bytes big-endian), ``value`` the amount to transfer and
    ``permitted`` the signed ``permitted.amount`` (``upto``: the maximum)."""

    chain_id: int
    token: bytes  # 20 bytes
    payer: bytes  # 20 bytes, the authorization's `from`
    payee: bytes  # 20 bytes, `to`
    value: int  # token base units
    valid_after: int
    valid_before: int
    nonce: bytes  # 32 bytes
    signature: bytes  # 65 bytes r || s || v, v in {27, 28}
    network: str  # the network name as the client sent it (for responses)
    x402_version: int
    method: int = EIP3009
    permitted: int = 0  # Permit2: the signed permitted.amount

    @property
    def nonce_space(self) -> bytes:
        """The contract whose nonces the authorization uses: the token (EIP-3009) or Permit2,
        whose nonces are the payer's across all tokens."""
        return self.token if self.method == EIP3009 else PERMIT2

    @property
    def key(self) -> bytes:
        """The replay key: (chain, nonce space, payer, nonce)."""
        return self.chain_id.to_bytes(8, "big") + self.nonce_space + self.payer + self.nonce


class Accepted(msgspec.Struct, frozen=True, gc=False):
    """Result of a successful submit: the payment is durable under ``id``."""

    id: int
    payer: str
    duplicate: bool  # True when an identical payload was already on record


class Rejected(msgspec.Struct, frozen=True, gc=False):
    """Result of a refused submit: nothing was stored."""

    reason: str
    message: str
    payer: str | None = None


class Outcome(msgspec.Struct, frozen=True, gc=False):
    """The recorded final (or current) state of one payment."""

    id: int
    state: str
    chain_id: int
    payer: str
    payee: str
    value: int
    tx_hash: str | None = None
    block_number: int | None = None
    gas_used: int | None = None
    reason: str | None = None
    message: str | None = None

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


class SettleAnswer(msgspec.Struct, frozen=True):
    """What :meth:`Engine.settle` answers: the facilitator's SettleResponse, chain-agnostic.

    ``success`` is True at most once per payment (one payment, one purchase), except for a
    payment-identifier retry of that same purchase, which gets the stored answer again."""

    success: bool
    transaction: str = ""  # the batch's hash once known ("" in deferred mode until settled)
    reason: str | None = None  # x402 reason code when not successful
    message: str | None = None
    payer: str | None = None
    settlement_id: int | None = None  # the engine's record id (GET /settlements/{id})
    amount: int | None = None
    state: str | None = None  # the payment's state when answered


class Sale(msgspec.Struct, frozen=True, gc=False):
    """A /settle answered ``success`` for this payment: it was sold (one payment, one
    purchase). ``mode`` is the settlement mode of that answer; ``identifier`` the buyer's
    payment-identifier, whose retries get the same answer again."""

    payment_id: int
    mode: str  # "confirmed" | "deferred"
    identifier: str | None = None


# ---------------------------------------------------------------- records the stages share


class PendingItem(msgspec.Struct, frozen=True, gc=False):
    id: int
    payment: Payment
    arrived_at: float  # unix seconds; for max-wait and latency
    attempts: int = 0  # batches this item has been planned into

    @property
    def ready_at(self) -> float:
        # The token requires block.timestamp > validAfter.
        return float(self.payment.valid_after + 1)

    @property
    def deadline(self) -> float:
        return float(self.payment.valid_before)


class Batch(msgspec.Struct):
    token: bytes
    items: list[PendingItem]


class PaymentEvent(msgspec.Struct, frozen=True, gc=False):
    """One state change of one payment."""

    payment_id: int
    state: str
    batch_id: int | None = None
    tx_hash: str | None = None
    block_number: int | None = None
    gas_used: int | None = None
    fee_wei: int | None = None
    reason: str | None = None
    message: str | None = None


class BatchRecord(msgspec.Struct, frozen=True):
    """A signed batch transaction, written before it is broadcast."""

    id: int
    chain_id: int
    mode: str
    signer: str
    account_nonce: int
    gas_limit: int
    max_fee_per_gas: int
    tx_hash: str
    raw_tx: bytes
    payment_ids: list[int]


class BatchEvent(msgspec.Struct, frozen=True):
    batch_id: int
    state: str  # sent | mined | dead
    tx_hash: str | None = None
    block_number: int | None = None
    gas_used: int | None = None
    effective_gas_price: int | None = None
    message: str | None = None


class OpenPayment(msgspec.Struct, frozen=True):
    """A payment with no final state, as read back at start-up."""

    id: int
    payment: Payment
    accepted_at_ms: int
    state: str
    batch_id: int | None


class Clash(msgspec.Struct, frozen=True):
    """A payment the shared ledger did not record as this instance's: another instance holds
    its replay key (``owner``, and whether it is the identical payment), or the payer's
    cluster-wide unsettled credit would exceed its limit (``refusal``)."""

    owner: int | None = None
    identical: bool = False
    refusal: str | None = None


class Recovered(msgspec.Struct, frozen=True):
    open_payments: list[OpenPayment]
    open_batches: list[BatchRecord]
    next_payment_id: int
    next_batch_id: int
    # Replacements (fee bumps) of open batches, oldest first: (tx hash, raw transaction).
    replacements: dict[int, list[tuple[str, bytes]]] = msgspec.field(default_factory=dict)


class InflightBatch(msgspec.Struct):
    record: BatchRecord
    items: list[PendingItem]
    token: bytes
    target: bytes
    sent_at: float
    # Fee-bumped replacements (same account nonce), oldest first: (tx hash, raw). The batch is
    # watched under the original hash and every replacement's until one of them is mined.
    replacements: list[tuple[str, bytes]] = msgspec.field(default_factory=list)

    def hashes(self) -> list[str]:
        return [self.record.tx_hash, *(h for h, _ in self.replacements)]

    def latest_raw(self) -> bytes:
        return self.replacements[-1][1] if self.replacements else self.record.raw_tx


class EngineError(RuntimeError):
    """The engine cannot do what was asked (e.g. the ledger refused a write)."""


class ChainMismatch(EngineError):
    pass


# A payment as a msgpack-friendly tuple (msgpack has no integers past 2**64, so the value is 32
# bytes big-endian): the journal's rows and the verify workers' answers.
# Permit2 payments append (method, permitted as 32 bytes); EIP-3009 rows stay 11 long.
PaymentTuple = tuple[Any, ...]


def payment_to_tuple(p: Payment) -> PaymentTuple:
    head = (
        p.chain_id,
        p.token,
        p.payer,
        p.payee,
        p.value.to_bytes(32, "big"),
        p.valid_after,
        p.valid_before,
        p.nonce,
        p.signature,
        p.network,
        p.x402_version,
    )
    if p.method == EIP3009:
        return head
    return (*head, p.method, p.permitted.to_bytes(32, "big"))


def payment_from_tuple(t: PaymentTuple) -> Payment:
    return Payment(
        chain_id=t[0],
        token=t[1],
        payer=t[2],
        payee=t[3],
        value=int.from_bytes(t[4], "big"),
        valid_after=t[5],
        valid_before=t[6],
        nonce=t[7],
        signature=t[8],
        network=t[9],
        x402_version=t[10],
        method=t[11] if len(t) > 11 else EIP3009,
        permitted=int.from_bytes(t[12], "big") if len(t) > 12 else 0,
    )


def hex_addr(raw: bytes) -> str:
    return "0x" + raw.hex()
