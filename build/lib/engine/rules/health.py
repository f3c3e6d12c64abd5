"""Is settlement moving? A pure judgement over the engine's statistics (``/healthz``)."""

from __future__ import annotations

import msgspec


class Health(msgspec.Struct, frozen=True):
    ok: bool
    reason: str  # "" when ok
    pending: int
    since_progress_s: float


def judge_health(
    *,
    now: float,
    last_progress: float,
    pending: int,
    inflight: int,
    queued: int,
    blocked_since: float | None,
    free_slots: int,
    slots: int,
    stall_after_s: float,
) -> Health:
    """Stalled: work waits (batches in flight, or a planned batch waiting for the submit
    stage) and nothing progressed (no batch sent, no payment final) for ``stall_after_s``.
    Payments that wait for their schedule are not work waiting (pure)."""
    idle = max(0.0, now - last_progress)
    waiting = inflight > 0 or blocked_since is not None
    if not waiting or idle < stall_after_s:
        return Health(True, "", pending, idle)
    parts = [f"no batch sent and no payment final for {idle:.0f} s"]
    if inflight:
        parts.append(f"{inflight} batches in flight without a final receipt")
    if blocked_since is not None:
        parts.append(f"a batch waiting {now - blocked_since:.0f} s to be sent")
    parts.append(f"{free_slots} of {slots} in-flight slots free")
    if free_slots == 0 and inflight == 0:
        parts.append("(slots taken with nothing in flight: leaked)")
    parts.append(f"{queued} payments queued, {pending} not final")
    return Health(False, "; ".join(parts), pending, idle)
