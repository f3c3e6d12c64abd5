"""A crawler day, scaled down, on a fast clock: crawlers pay sites per request all day, the sites
settle at midnight UTC in one sweep, nothing settles before it, everything settles after it,
exactly once, in a handful of transactions."""

from __future__ import annotations

import calendar
import random
import time
from pathlib import Path

import msgspec
import pytest
import trio
import trio.testing

from engine.chain.crypto import private_key_address
from engine.chain.rpc import Rpc
from engine.clock import TrioWallClock
from engine.config import CreditConfig, LedgerConfig, PayeeScheduleConfig, PolicyConfig
from engine.dev.devchain import Anvil, engine_config, new_key, setup_devchain
from engine.dev.loadgen import TokenDomain, requirements_v2, sign_authorization
from engine.engine import Engine
from engine.model import Accepted, PaymentPayloadV2, hex_addr

from .chain import balances

pytestmark = pytest.mark.chain
RATE = 10_000  # simulated seconds per real second: a day in under 9 s
CRAWLERS = 10
SITES = 4
REQUESTS = 40  # per crawler over the day
PRICE = 1000  # $0.001 in a 6-decimal token


def _payment(
    domain: TokenDomain, key: bytes, site: bytes, valid_before: int
) -> tuple[PaymentPayloadV2, object]:
    req = requirements_v2(domain, site, PRICE)
    payload = sign_authorization(domain, key, site, PRICE, 0, valid_before)
    return PaymentPayloadV2(accepted=req, payload=payload), req


async def test_crawler_day_settles_in_one_sweep_at_midnight_exactly_once(
    anvil: Anvil, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    mock_clock.rate = 1.0  # real time while the chain is set up
    dev = await setup_devchain(anvil.url, payers=CRAWLERS, payer_balance=REQUESTS * PRICE)
    sites = [private_key_address(new_key()) for _ in range(SITES)]
    today = time.gmtime()
    day_start = calendar.timegm((today.tm_year, today.tm_mon, today.tm_mday, 0, 0, 0))
    midnight = day_start + 86_400
    config, env = engine_config(
        dev,
        str(tmp_path / "ledger.duckdb"),
        policy=PolicyConfig(
            payees=[
                PayeeScheduleConfig(payee=hex_addr(s), mode="scheduled", times_utc=["00:00"])
                for s in sites
            ]
        ),
        # Engine-time settings scaled so that, in real time, they stay what they usually are.
        poll_interval_ms=200 * RATE,
        rebroadcast_after_s=6.0 * RATE,
        rpc_timeout_s=10.0 * RATE,
    )
    config = msgspec.structs.replace(
        config,
        ledger=LedgerConfig(path=config.ledger.path, flush_interval_ms=50 * RATE),
        credit=CreditConfig(refresh_s=600.0, balance_max_age_s=3600.0 * 24),
    )
    rpc = Rpc(anvil.url)
    keys = dev.payer_key_bytes()
    # Signed for the whole simulated day and beyond (the chain runs on real time, behind it).
    valid_before = midnight + 2 * 86_400
    accepted: list[int] = []
    async with Engine.open(config, environ=env, clock=TrioWallClock(day_start + 60)) as engine:
        mock_clock.rate = RATE
        clock = engine.clock

        async def crawler(key: bytes, seed: int) -> None:
            rng = random.Random(seed)
            for _ in range(REQUESTS):
                # Requests spread over the day (engine time), ending well before midnight.
                await trio.sleep(rng.uniform(0, 0.9 * 86_400 / REQUESTS))
                site = sites[rng.randrange(SITES)]
                result = await engine.submit(*_payment(dev.domain, key, site, valid_before))
                assert isinstance(result, Accepted), result
                accepted.append(result.id)

        async with trio.open_nursery() as nursery:
            for i, key in enumerate(keys):
                nursery.start_soon(crawler, key, i)
        assert clock.now() < midnight
        assert len(accepted) == CRAWLERS * REQUESTS
        stats = engine.statistics()
        assert stats.settled == 0 and stats.batches_sent == 0  # nothing before the sweep
        credit = engine.credit_statistics()[dev.chain_id]
        assert sum(credit["owed"].values()) == CRAWLERS * REQUESTS * PRICE
        with trio.fail_after(2 * 86_400):  # engine time: the sweep must finish after midnight
            await engine.drain()
        assert clock.now() >= midnight
        stats = engine.statistics()
        assert stats.settled == CRAWLERS * REQUESTS and stats.failed == {}
        # One pool per site, 40 payments each at most: one transaction per site.
        assert stats.batches_mined == SITES
        sent_at = await engine.query(
            "SELECT min(at_ms), max(at_ms) FROM batch_events WHERE state = 'sent'"
        )
        assert sent_at[0][0] >= midnight * 1000  # the sweep started at midnight, not before
        mock_clock.rate = 1.0
    got = await balances(rpc, dev.token, [hex_addr(s) for s in sites])
    assert sum(got) == CRAWLERS * REQUESTS * PRICE  # every payment collected exactly once
    await rpc.aclose()
