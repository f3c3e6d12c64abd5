"""What ``x402-engine pay`` decides without I/O: the load's shape, each answer's meaning, and the
summary (counts by outcome and reason, latency quantiles, what the chain shows).

An *answer* is what the facilitator (or the resource server) said about one payment; the chain
figures come afterwards from the token's ``AuthorizationUsed`` logs, so they hold for any
facilitator, ours or another.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Literal

import msgspec

Verdict = Literal["settled", "accepted", "rejected", "error"]


class Shape(msgspec.Struct, frozen=True):
    """How many payments, how fast. ``rate`` set: an open loop (payments start on a schedule,
    at most ``concurrency`` in flight); else a closed loop of ``concurrency`` workers, each
    sending its next payment when the last is answered. The run stops at ``count`` payments or
    after ``duration_s``, whichever comes first; at least one of them is set."""

    count: int | None = None
    duration_s: float | None = None
    rate: float | None = None
    concurrency: int = 1

    def problem(self) -> str | None:
        """Why this shape cannot run, or None."""
        if self.count is None and self.duration_s is None:
            return "give --count or --duration (a load is always bounded)"
        if self.count is not None and self.count < 1:
            return "--count must be at least 1"
        if self.duration_s is not None and not self.duration_s > 0:
            return "--duration must be positive"
        if self.rate is not None and not self.rate > 0:
            return "--rate must be positive"
        if self.concurrency < 1:
            return "--concurrency must be at least 1"
        return None

    def start_offset_s(self, index: int) -> float:
        """Open loop: when payment ``index`` is due, from the start (0 in a closed loop)."""
        return index / self.rate if self.rate else 0.0

    def more(self, index: int, elapsed_s: float) -> bool:
        """May payment ``index`` still start, ``elapsed_s`` into the run?"""
        if self.count is not None and index >= self.count:
            return False
        return self.duration_s is None or elapsed_s < self.duration_s


class Answer(msgspec.Struct, frozen=True):
    """One payment's fate as its sender saw it."""

    verdict: Verdict
    latency_s: float  # from when it was due (open loop) or sent (closed loop) to the answer
    reason: str = ""  # the x402 reason code, or what went wrong on the way
    transaction: str = ""
    settlement_id: str = ""


def settle_verdict(body: object) -> tuple[Verdict, str, str, str]:
    """A facilitator's ``/settle`` answer as (verdict, reason, transaction, settlement id):
    ``settled`` with a transaction hash, ``accepted`` when successful without one (deferred),
    ``rejected`` with its ``errorReason``, ``error`` when it is not a settle response."""
    if not isinstance(body, dict) or not isinstance(body.get("success"), bool):
        return "error", "not_a_settle_response", "", ""
    extra = body.get("extra")
    settlement_id = ""
    if isinstance(extra, dict) and extra.get("settlementId") is not None:
        settlement_id = str(extra["settlementId"])
    transaction = body.get("transaction") or ""
    if not isinstance(transaction, str):
        transaction = ""
    if body["success"]:
        return ("settled" if transaction else "accepted"), "", transaction, settlement_id
    reason = body.get("errorReason") or "unspecified"
    return "rejected", str(reason), transaction, settlement_id


def verify_verdict(body: object) -> str | None:
    """None if a ``/verify`` answer says valid, else its ``invalidReason``."""
    if not isinstance(body, dict) or not isinstance(body.get("isValid"), bool):
        return "not_a_verify_response"
    if body["isValid"]:
        return None
    return str(body.get("invalidReason") or "unspecified")


def quantile(ordered: list[float], q: float) -> float:
    """The nearest-rank ``q`` quantile of sorted values (NaN when there are none)."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


class ChainView(msgspec.Struct, frozen=True):
    """What the chain shows for the payments the facilitator accepted."""

    found: int  # accepted payments whose authorization is used on chain
    transactions: int  # distinct transactions that used them
    gas_used: int  # those transactions' gas, in total
    waited_s: float  # how long we waited for them after the last answer
    missing: int = 0  # answered settled, with a transaction, yet not on chain: a false answer

    @property
    def gas_per_payment(self) -> int | None:
        return self.gas_used // self.found if self.found else None


class Summary(msgspec.Struct, frozen=True):
    sent: int
    settled: int  # success, with a transaction hash
    accepted: int  # success without one (settled later: deferred facilitators)
    rejected: dict[str, int]
    errors: dict[str, int]
    wall_s: float  # first payment sent to last answer
    p50_ms: float
    p99_ms: float
    p999_ms: float
    chain: ChainView | None = None

    @property
    def successes(self) -> int:
        return self.settled + self.accepted

    @property
    def settled_per_s(self) -> float:
        return self.settled / self.wall_s if self.wall_s > 0 else 0.0


def summarize(answers: list[Answer], wall_s: float, chain: ChainView | None = None) -> Summary:
    """Counts and latency quantiles (of successful answers: a refusal is fast and says nothing
    about settling)."""
    verdicts = Counter(a.verdict for a in answers)
    ordered = sorted(a.latency_s for a in answers if a.verdict in ("settled", "accepted"))
    return Summary(
        sent=len(answers),
        settled=verdicts["settled"],
        accepted=verdicts["accepted"],
        rejected=dict(Counter(a.reason for a in answers if a.verdict == "rejected")),
        errors=dict(Counter(a.reason for a in answers if a.verdict == "error")),
        wall_s=wall_s,
        p50_ms=quantile(ordered, 0.5) * 1000,
        p99_ms=quantile(ordered, 0.99) * 1000,
        p999_ms=quantile(ordered, 0.999) * 1000,
        chain=chain,
    )


def summary_lines(s: Summary) -> list[str]:
    """The summary as text lines of at most 80 columns."""

    def ms(v: float) -> str:
        return "-" if math.isnan(v) else f"{v:,.0f} ms"

    lines = [
        f"sent        {s.sent:,} in {s.wall_s:,.1f} s",
        f"settled     {s.settled:,} with a transaction ({s.settled_per_s:,.1f}/s)",
    ]
    if s.accepted:
        lines.append(f"accepted    {s.accepted:,} without a transaction yet (deferred)")
    for title, counts in (("rejected", s.rejected), ("errors", s.errors)):
        total = sum(counts.values())
        if total:
            lines.append(f"{title:<11} {total:,}")
            lines.extend(f"  {reason}: {n:,}" for reason, n in sorted(counts.items()))
    lines.append(f"latency     p50 {ms(s.p50_ms)}, p99 {ms(s.p99_ms)}, p99.9 {ms(s.p999_ms)}")
    lines.extend(chain_lines(s))
    return lines


def chain_lines(s: Summary) -> list[str]:
    """What the chain shows of the successful payments (nothing before it was asked)."""
    c = s.chain
    if c is None:
        return []
    gas = f"{c.gas_per_payment:,} gas per payment" if c.gas_per_payment else "no gas"
    lines = [
        f"on chain    {c.found:,} of {s.successes:,} in {c.transactions:,} transactions, {gas}"
    ]
    if c.missing:
        lines.append(
            f"NOT FOUND   {c.missing:,} answered settled with a transaction are not on"
            f" chain after {c.waited_s:,.0f} s"
        )
    return lines
