"""Batch calldata and receipt-log codecs for the X402Batcher contract and Multicall3, no I/O.

Compact item layout (165 bytes, big-endian, tightly packed), as ``X402Batcher.settle`` reads it:
``from 20 | to 20 | value 16 | validAfter 6 | validBefore 6 | nonce 32 | r 32 | s 32 | v 1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

import msgspec
from eth_abi.abi import decode as abi_decode
from eth_abi.abi import encode as abi_encode

from ..model import EIP3009, Payment
from ..rules import reasons
from . import permit2
from .crypto import keccak256

ITEM_SIZE = 165


def selector(signature: str) -> bytes:
    return keccak256(signature.encode())[:4]


def topic(signature: str) -> bytes:
    return keccak256(signature.encode())


SETTLE = selector("settle(address,bytes)")
SIMULATE = selector("simulate(address,bytes)")
AGGREGATE3 = selector("aggregate3((address,bool,bytes)[])")
_SIGNED_ITEM = "(address,address,uint256,uint256,uint256,bytes32,bytes,address,bytes)"
SETTLE_SIGNED = selector(f"settleSigned(address,{_SIGNED_ITEM}[])")
SIMULATE_SIGNED = selector(f"simulateSigned(address,{_SIGNED_ITEM}[])")
SETTLE_CALLS = selector("settleCalls((address,bytes)[])")
SIMULATE_CALLS = selector("simulateCalls((address,bytes)[])")
ERC6492_SUFFIX = bytes.fromhex("64926492" * 8)
TRANSFER_WITH_AUTHORIZATION = selector(
    "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)"
)
# transferWithAuthorization(from, to, value, validAfter, validBefore, nonce, v, r, s)
TRANSFER_WITH_AUTHORIZATION_TYPES = [
    "address",
    "address",
    "uint256",
    "uint256",
    "uint256",
    "bytes32",
    "uint8",
    "bytes32",
    "bytes32",
]
AUTHORIZATION_STATE = selector("authorizationState(address,bytes32)")
BALANCE_OF = selector("balanceOf(address)")
ERROR_STRING = selector("Error(string)")
PANIC = selector("Panic(uint256)")
SIMULATION_RESULT = selector("SimulationResult(bool[],bytes[],uint256)")

AUTHORIZATION_USED = topic("AuthorizationUsed(address,bytes32)")
AUTHORIZATION_CANCELED = topic("AuthorizationCanceled(address,bytes32)")
ITEM_FAILED = topic("ItemFailed(uint256,bytes)")
CALL_FAILED = topic("CallFailed(uint256,bytes)")
TRANSFER = topic("Transfer(address,address,uint256)")


def pack_item(p: Payment) -> bytes:
    sig = p.signature
    return b"".join(
        (
            p.payer,
            p.payee,
            p.value.to_bytes(16, "big"),
            p.valid_after.to_bytes(6, "big"),
            p.valid_before.to_bytes(6, "big"),
            p.nonce,
            sig[0:32],
            sig[32:64],
            sig[64:65],
        )
    )


def compact_fits(p: Payment) -> bool:
    """Whether the 165-byte compact item can carry the payment: an EIP-3009 authorization with
    a 65-byte signature (an EOA's, or a smart wallet's that is 65 bytes: the token asks the
    wallet through EIP-1271)."""
    return p.method == EIP3009 and len(p.signature) == 65


def unwrap_6492(signature: bytes) -> tuple[bytes, bytes, bytes] | None:
    """An ERC-6492 signature's (factory, factory calldata, inner signature), or None."""
    if len(signature) < 32 + 96 or signature[-32:] != ERC6492_SUFFIX:
        return None
    try:
        factory, call, inner = abi_decode(["address", "bytes", "bytes"], signature[:-32])
    except Exception:  # malformed wrapping: not a 6492 signature we can use
        return None
    return bytes.fromhex(factory[2:]), bytes(call), bytes(inner)


def settle_signed_calldata(
    token: bytes, items: Sequence[Payment], *, simulate: bool = False
) -> bytes:
    """``settleSigned`` (or ``simulateSigned``) for payments with signatures of any length:
    an ERC-6492 signature becomes its factory call and its inner signature."""
    rows = []
    for p in items:
        wrapped = unwrap_6492(p.signature)
        factory, call, signature = wrapped if wrapped else (bytes(20), b"", p.signature)
        rows.append(
            (
                p.payer,
                p.payee,
                p.value,
                p.valid_after,
                p.valid_before,
                p.nonce,
                signature,
                factory,
                call,
            )
        )
    head = SIMULATE_SIGNED if simulate else SETTLE_SIGNED
    return head + abi_encode(["address", f"{_SIGNED_ITEM}[]"], [token, rows])


def settle_calls_calldata(
    items: Sequence[Payment], facilitator: bytes | None = None, *, simulate: bool = False
) -> bytes:
    """``settleCalls`` (or ``simulateCalls``) of Permit2 payments: one proxy ``settle`` each
    (``upto``: naming ``facilitator``, the batcher the calls go through)."""
    calls = [permit2.settle_call(p, facilitator) for p in items]
    head = SIMULATE_CALLS if simulate else SETTLE_CALLS
    return head + abi_encode(["(address,bytes)[]"], [calls])


def settle_calldata(
    token: bytes,
    items: Sequence[Payment],
    *,
    simulate: bool = False,
    facilitator: bytes | None = None,
) -> bytes:
    """``settle`` (or ``simulate``) with compact items; ``settleSigned`` when a payment's
    signature does not fit the compact item; ``settleCalls`` for Permit2 payments (all report
    failures the same way). A batch holds one kind: EIP-3009 or Permit2."""
    permit2_items = sum(p.method != EIP3009 for p in items)
    if permit2_items:
        if permit2_items != len(items):
            raise ValueError("a batch mixes EIP-3009 and Permit2 payments")
        return settle_calls_calldata(items, facilitator, simulate=simulate)
    if not all(compact_fits(p) for p in items):
        return settle_signed_calldata(token, items, simulate=simulate)
    packed = b"".join(pack_item(p) for p in items)
    head = SIMULATE if simulate else SETTLE
    return head + abi_encode(["address", "bytes"], [token, packed])


def transfer_calldata(p: Payment) -> bytes:
    sig = p.signature
    return TRANSFER_WITH_AUTHORIZATION + abi_encode(
        TRANSFER_WITH_AUTHORIZATION_TYPES,
        [
            p.payer,
            p.payee,
            p.value,
            p.valid_after,
            p.valid_before,
            p.nonce,
            sig[64],
            sig[0:32],
            sig[32:64],
        ],
    )


def aggregate3(calls: Sequence[tuple[bytes, bool, bytes]]) -> bytes:
    """Multicall3 ``aggregate3`` calldata for (target, allowFailure, calldata) calls.

    ABI-encoded by hand for this one fixed shape: eth_abi's general encoder cost a tenth of
    the facilitator's CPU under /verify load (measured with py-spy); a test checks the bytes
    against eth_abi."""
    n = len(calls)
    heads: list[bytes] = []
    tails: list[bytes] = []
    offset = 32 * n
    for target, allow_failure, data in calls:
        if len(target) != 20:
            raise ValueError(f"not an address: {target!r}")
        padded = data + bytes(-len(data) % 32)
        tail = b"".join(
            (
                bytes(12) + target,
                (1 if allow_failure else 0).to_bytes(32, "big"),
                (96).to_bytes(32, "big"),
                len(data).to_bytes(32, "big"),
                padded,
            )
        )
        heads.append(offset.to_bytes(32, "big"))
        tails.append(tail)
        offset += len(tail)
    return b"".join((AGGREGATE3, (32).to_bytes(32, "big"), n.to_bytes(32, "big"), *heads, *tails))


def aggregate3_calldata(token: bytes, items: Sequence[Payment]) -> bytes:
    return aggregate3([(token, True, transfer_calldata(p)) for p in items])


def authorization_state_calldata(payer: bytes, nonce: bytes) -> bytes:
    return AUTHORIZATION_STATE + bytes(12) + payer + nonce


def balance_of_calldata(owner: bytes) -> bytes:
    return BALANCE_OF + bytes(12) + owner


# ------------------------------------------------------------------------- revert data


def revert_message(data: bytes) -> str:
    """Human-readable text of revert data (Error(string), Panic(uint256) or raw hex)."""
    if data[:4] == ERROR_STRING:
        try:
            (text,) = abi_decode(["string"], data[4:])
            return str(text)
        except Exception:  # malformed revert data from an arbitrary contract
            return "0x" + data.hex()
    if data[:4] == PANIC and len(data) >= 36:
        return f"panic 0x{int.from_bytes(data[4:36], 'big'):02x}"
    if not data:
        return "reverted without data"
    return "0x" + data.hex()


def failure_reason(data: bytes) -> tuple[str, str]:
    """(x402 reason, message) for an item's revert data."""
    known = permit2.failure(data)
    if known is not None:
        return known
    message = revert_message(data)
    return reasons.reason_for_revert(message), message


def decode_simulation(revert_data: bytes) -> tuple[list[tuple[bool, bytes]], int] | None:
    """Per item (succeeded, revert data), and the gas the item calls used, from
    ``simulate``'s SimulationResult revert."""
    if revert_data[:4] != SIMULATION_RESULT:
        return None
    ok, data, gas_used = abi_decode(["bool[]", "bytes[]", "uint256"], revert_data[4:])
    if len(ok) != len(data):
        return None
    return [(bool(a), bytes(b)) for a, b in zip(ok, data, strict=True)], int(gas_used)


def calldata_gas(data: bytes) -> int:
    """Intrinsic calldata cost: 16 gas per non-zero byte, 4 per zero byte."""
    return 16 * len(data) - 12 * data.count(0)


def balances_aggregate3_calldata(token: bytes, owners: Sequence[bytes]) -> bytes:
    """One aggregate3 call reading ``balanceOf`` of every owner (failures allowed)."""
    return aggregate3([(token, True, balance_of_calldata(o)) for o in owners])


def decode_balances(return_data: bytes) -> list[int | None]:
    """Balances from :func:`balances_aggregate3_calldata`'s result (None: that call failed)."""
    return [
        int.from_bytes(data[:32], "big") if ok and len(data) >= 32 else None
        for ok, data in decode_aggregate3_result(return_data)
    ]


def decode_aggregate3_result(return_data: bytes) -> list[tuple[bool, bytes]]:
    """``aggregate3``'s ``(bool success, bytes returnData)[]``, decoded by hand with bounds
    checks (the counterpart of :func:`aggregate3`); ValueError if malformed."""
    data = memoryview(return_data)
    size = len(data)

    def word(at: int) -> int:
        if at < 0 or at + 32 > size:
            raise ValueError("aggregate3 result is truncated")
        return int.from_bytes(data[at : at + 32], "big")

    array = word(0)
    n = word(array)
    if n > size // 32:
        raise ValueError("aggregate3 result claims more entries than it holds")
    base = array + 32
    out: list[tuple[bool, bytes]] = []
    for i in range(n):
        item = base + word(base + 32 * i)
        ok = word(item)
        start = item + word(item + 32)
        length = word(start)
        if ok > 1 or start + 32 + length > size:
            raise ValueError("aggregate3 result entry is malformed")
        out.append((ok == 1, bytes(data[start + 32 : start + 32 + length])))
    return out


# ------------------------------------------------------------------------- receipt logs


class Log(msgspec.Struct, rename="camel"):
    address: str
    topics: list[str]
    data: str


class Receipt(msgspec.Struct, rename="camel"):
    transaction_hash: str
    block_number: str
    block_hash: str
    status: str
    gas_used: str
    effective_gas_price: str = "0x0"
    logs: list[Log] = msgspec.field(default_factory=list)


class ItemStatus(Enum):
    SETTLED = "settled"
    FAILED = "failed"
    UNKNOWN = "unknown"  # no trace in the logs (e.g. canonical Multicall3 emits no failures)


class ItemOutcome(msgspec.Struct, frozen=True):
    status: ItemStatus
    reason: str | None = None
    message: str | None = None


def item_outcomes(
    receipt: Receipt, batcher: bytes, token: bytes, items: Sequence[Payment]
) -> list[ItemOutcome]:
    """Each item's outcome from a mined batch's logs: the token's AuthorizationUsed event is
    the proof of settlement, and a token Transfer(payer, payee, value) must go with it (as the
    reference facilitator checks; each Transfer log vouches for one item); the batcher's
    ItemFailed / CallFailed event carries the reason of a failure."""
    token_hex = "0x" + token.hex()
    batcher_hex = "0x" + batcher.hex()
    used: set[tuple[str, str]] = set()
    failed: dict[int, bytes] = {}
    used_topic = "0x" + AUTHORIZATION_USED.hex()
    transfer_topic = "0x" + TRANSFER.hex()
    failed_topics = {"0x" + ITEM_FAILED.hex(), "0x" + CALL_FAILED.hex()}
    transfers: dict[tuple[str, str, int], int] = {}  # (from, to, value) -> logs not yet matched
    for log in receipt.logs:
        if not log.topics:
            continue
        address = log.address.lower()
        t0 = log.topics[0].lower()
        if address == token_hex and t0 == used_topic and len(log.topics) == 3:
            used.add((log.topics[1].lower()[-40:], log.topics[2].lower()))
        elif address == token_hex and t0 == transfer_topic and len(log.topics) == 3:
            moved = (log.topics[1].lower()[-40:], log.topics[2].lower()[-40:], _word(log.data))
            transfers[moved] = transfers.get(moved, 0) + 1
        elif address == batcher_hex and t0 in failed_topics:
            index, data = abi_decode(["uint256", "bytes"], bytes.fromhex(log.data[2:]))
            failed[int(index)] = bytes(data)
    out: list[ItemOutcome] = []
    for i, p in enumerate(items):
        if p.method != EIP3009:
            # Permit2 logs nothing per nonce: the batcher's silence (no ItemFailed) says the
            # proxy's settle succeeded, and the token's Transfer says it moved this payment.
            out.append(_permit2_outcome(p, failed.get(i), transfers, receipt))
        elif (p.payer.hex(), "0x" + p.nonce.hex()) in used:
            moved = (p.payer.hex(), p.payee.hex(), p.value)
            if transfers.get(moved, 0) > 0:
                transfers[moved] -= 1
                out.append(ItemOutcome(ItemStatus.SETTLED))
            else:
                out.append(
                    ItemOutcome(
                        ItemStatus.FAILED,
                        reasons.TRANSFER_EVENT_MISMATCH,
                        f"the authorization was used but no Transfer of {p.value} from the payer"
                        " to the payee is in the receipt",
                    )
                )
        elif i in failed:
            reason, message = failure_reason(failed[i])
            out.append(ItemOutcome(ItemStatus.FAILED, reason, message))
        else:
            out.append(ItemOutcome(ItemStatus.UNKNOWN))
    return out


def _permit2_outcome(
    p: Payment,
    revert: bytes | None,
    transfers: dict[tuple[str, str, int], int],
    receipt: Receipt,
) -> ItemOutcome:
    if revert is not None:
        reason, message = failure_reason(revert)
        return ItemOutcome(ItemStatus.FAILED, reason, message)
    if int(receipt.status, 16) != 1:
        return ItemOutcome(ItemStatus.UNKNOWN)
    moved = (p.payer.hex(), p.payee.hex(), p.value)
    if transfers.get(moved, 0) > 0:
        transfers[moved] -= 1
        return ItemOutcome(ItemStatus.SETTLED)
    return ItemOutcome(
        ItemStatus.FAILED,
        reasons.TRANSFER_EVENT_MISMATCH,
        f"the proxy's settle succeeded but no Transfer of {p.value} from the payer to the payee"
        " is in the receipt",
    )


def _word(data: str) -> int:
    """The first 32-byte word of a log's hex data (-1 if there is none)."""
    text = data[2:66] if data.startswith(("0x", "0X")) else data[:64]
    return int(text, 16) if len(text) == 64 else -1


def transfer_in_receipt(
    receipt: Receipt, token: bytes, payer: bytes, payee: bytes, value: int
) -> bool:
    """Whether ``receipt`` holds the token's ``Transfer(payer, payee, value)``: a payment whose
    nonce another transaction used is settled only if that transaction moved exactly this."""
    if int(receipt.status, 16) != 1:
        return False
    token_hex = "0x" + token.hex()
    transfer = "0x" + TRANSFER.hex()
    want_from = "0x" + bytes(12).hex() + payer.hex()
    want_to = "0x" + bytes(12).hex() + payee.hex()
    for log in receipt.logs:
        if (
            log.address.lower() == token_hex
            and len(log.topics) == 3
            and log.topics[0].lower() == transfer
            and log.topics[1].lower() == want_from
            and log.topics[2].lower() == want_to
            and log.data[2:]
            and int(log.data[2:66], 16) == value
        ):
            return True
    return False
