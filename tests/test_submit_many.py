"""``Engine.submit_many``: one call, many payments, answers in order, same rules as ``submit``."""

from __future__ import annotations

import os
import time
from pathlib import Path

import msgspec
import pytest

from engine.dev.devchain import Anvil, engine_config, setup_devchain
from engine.dev.loadgen import payment_v2, to_json
from engine.engine import Engine
from engine.model import Accepted, Rejected
from engine.rules import reasons

pytestmark = pytest.mark.chain


@pytest.mark.parametrize("verify_workers", [0, 1])
async def test_submit_many_answers_in_order_with_duplicates_conflicts_and_rejections(
    anvil: Anvil, tmp_path: Path, verify_workers: int
) -> None:
    dev = await setup_devchain(anvil.url, payers=3)
    config, env = engine_config(dev, str(tmp_path / "l.duckdb"))
    config = msgspec.structs.replace(
        config, ingest=msgspec.structs.replace(config.ingest, verify_workers=verify_workers)
    )
    keys = dev.payer_key_bytes()
    payee = bytes.fromhex(dev.payee[2:])
    now = int(time.time())
    nonce = os.urandom(32)
    a = payment_v2(dev.domain, keys[0], payee, 1000, now, nonce=nonce)
    same_nonce_other_value = payment_v2(dev.domain, keys[0], payee, 2000, now, nonce=nonce)
    b = payment_v2(dev.domain, keys[1], payee, 1000, now)
    forged = msgspec.json.decode(to_json(b[0]))
    forged["payload"]["signature"] = "0x" + "22" * 65
    c = payment_v2(dev.domain, keys[2], payee, 1000, now)
    async with Engine.open(config, environ=env) as engine:
        earlier = await engine.submit(*c)
        assert isinstance(earlier, Accepted)
        results = await engine.submit_many([a, same_nonce_other_value, (forged, b[1]), b, a, c])
        assert [type(r) for r in results] == [
            Accepted,
            Rejected,
            Rejected,
            Accepted,
            Accepted,
            Accepted,
        ]
        ra, conflict, bad, rb, ra2, rc = results
        assert isinstance(conflict, Rejected) and conflict.reason == reasons.NONCE_USED
        assert isinstance(bad, Rejected) and bad.reason == reasons.SIGNATURE
        assert isinstance(ra, Accepted) and isinstance(ra2, Accepted)
        assert ra2.id == ra.id and ra2.duplicate and not ra.duplicate
        assert isinstance(rc, Accepted) and rc.id == earlier.id and rc.duplicate
        assert isinstance(rb, Accepted) and not rb.duplicate
        assert await engine.submit_many([]) == []
        await engine.drain(timeout_s=60)
        rows = await engine.query("SELECT count(*) FROM payments")
        assert rows == [(3,)]
        assert engine.statistics().settled == 3
