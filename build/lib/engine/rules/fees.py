"""EIP-1559 fee policy, pure."""

from __future__ import annotations

import msgspec


class Fees(msgspec.Struct, frozen=True):
    max_fee_per_gas: int
    max_priority_fee_per_gas: int


def choose_fees(base_fee: int, priority_fee: int, max_fee_cap: int) -> Fees | None:
    """Offer twice the current base fee plus the tip (survives ~6 full blocks of base-fee rise),
    never above ``max_fee_cap``. None when the cap cannot cover the base fee and tip right now:
    the caller waits rather than overpays."""
    assert base_fee >= 0 and priority_fee >= 0 and max_fee_cap > 0
    if base_fee + priority_fee > max_fee_cap:
        return None
    max_fee = min(2 * base_fee + priority_fee, max_fee_cap)
    return Fees(max_fee, priority_fee)


REPLACEMENT_BUMP_NUM, REPLACEMENT_BUMP_DEN = 9, 8  # +12.5%: nodes want >= +10% to replace


def bump_fees(current: Fees, base_fee: int, priority_fee: int, max_fee_cap: int) -> Fees | None:
    """Fees for a replacement of a transaction stuck under a base fee that rose past its
    ``max_fee_per_gas``: both fees at least +12.5% (what nodes require to replace), at least
    what :func:`choose_fees` offers now, never above ``max_fee_cap``. None when it is not stuck
    (it can still be included) or the cap leaves no room for a valid replacement."""
    assert base_fee >= 0 and priority_fee >= 0 and max_fee_cap > 0
    if current.max_fee_per_gas >= base_fee + current.max_priority_fee_per_gas:
        return None  # includable as it is: waiting is cheaper
    floor_max = -(-current.max_fee_per_gas * REPLACEMENT_BUMP_NUM // REPLACEMENT_BUMP_DEN)
    floor_tip = -(-current.max_priority_fee_per_gas * REPLACEMENT_BUMP_NUM // REPLACEMENT_BUMP_DEN)
    tip = max(priority_fee, floor_tip)
    wanted = max(2 * base_fee + tip, floor_max)
    max_fee = min(wanted, max_fee_cap)
    if max_fee < floor_max or tip > max_fee:
        return None
    return Fees(max_fee, tip)
