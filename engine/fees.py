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
