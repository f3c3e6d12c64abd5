"""The seeded fault campaign, a bounded slice of it (``x402-engine campaign`` runs more): the
real engine against the in-process chain simulator under RPC faults, lost and erroring sends,
stale receipts, mempool drops, base-fee rises, reorganisations, third parties and crashes."""

from __future__ import annotations

import os

import pytest

from engine.sim.campaign import run

SEEDS = int(os.environ.get("X402_CAMPAIGN_SEEDS", "40"))


def test_campaign_seeds_keep_every_invariant() -> None:
    reports = run(list(range(SEEDS)))
    failed = {r.seed: r.problems for r in reports if not r.ok}
    assert not failed, "failing seeds (replay: x402-engine campaign --seed N): " + repr(failed)
    # the campaign exercised what it is for
    assert sum(r.reorgs for r in reports) > 0
    assert sum(r.replacements for r in reports) > 0
    assert sum(r.third_party for r in reports) > 0
    assert sum(r.lives > 1 for r in reports) > 0
    assert sum(r.settled for r in reports) > 0 and sum(r.failed for r in reports) > 0


@pytest.mark.parametrize("seed", [3, 11])
def test_a_seed_replays_identically(seed: int) -> None:
    first, again = run([seed]), run([seed])
    assert first[0].events_digest == again[0].events_digest != ""
    assert first[0].problems == again[0].problems
