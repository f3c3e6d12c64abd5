"""Several ``x402-engine serve`` processes on one PostgreSQL and one anvil, load spread over them
as a load balancer would: every acknowledged payment settles exactly once, the identical payment
sent to every instance is one transfer, a SIGKILLed instance's work is finished by a survivor,
and a PostgreSQL restart loses nothing acknowledged."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import pytest
import trio

from benchmarks.cluster import cluster, post_spread, settle_body
from engine.chain.rpc import Rpc
from engine.config import PolicyConfig
from engine.dev.devchain import Anvil, DevChain, setup_devchain
from engine.dev.loadgen import payment_v2
from engine.dev.postgres import PostgresServer
from engine.rules import reasons

from .chain import balances, count_authorization_used

pytestmark = pytest.mark.chain
VALUE = 1000


def _work(dev: DevChain, count: int) -> list[tuple[Any, Any]]:
    keys = dev.payer_key_bytes()
    payee = bytes.fromhex(dev.payee[2:])
    now = int(time.time())
    return [payment_v2(dev.domain, keys[i % len(keys)], payee, VALUE, now) for i in range(count)]


def _ledger_states(dsn: str) -> dict[int, str]:
    """payment id -> current state, straight from PostgreSQL."""
    with psycopg.connect(dsn) as con:
        rows = con.execute(
            "SELECT p.id, coalesce((SELECT state FROM payment_events e WHERE e.payment_id = p.id"
            " ORDER BY seq DESC LIMIT 1), 'accepted') FROM payments p"
        ).fetchall()
    return {int(r[0]): str(r[1]) for r in rows}


async def _until_all_final(dsn: str, timeout_s: float) -> dict[int, str]:
    with trio.fail_after(timeout_s):
        while True:
            states = await trio.to_thread.run_sync(_ledger_states, dsn)
            if states and all(s in ("settled", "failed") for s in states.values()):
                return states
            await trio.sleep(0.2)


async def _check_once_each(rpc: Rpc, dev: DevChain, work: list[tuple[Any, Any]]) -> int:
    """How many of ``work`` were transferred; asserts none twice."""
    paid = 0
    for payload, _ in work:
        auth = payload.payload.eip3009
        payer, nonce = bytes.fromhex(auth.from_[2:]), bytes.fromhex(auth.nonce[2:])
        used = await count_authorization_used(rpc, dev.token, payer, nonce)
        assert used <= 1
        paid += used
    return paid


@contextmanager
def _logs_on_failure(workdir: Path) -> Iterator[None]:
    """A failure carries the instances' log tails (they run in processes of their own)."""
    try:
        yield
    except (AssertionError, trio.TooSlowError) as exc:
        tails = "".join(
            f"\n--- {log.name}\n{log.read_text(errors='replace')[-3000:]}"
            for log in sorted(workdir.glob("*.log"))
        )
        raise AssertionError(f"{exc!r}{tails}") from exc


async def test_three_instances_settle_everything_once_and_survive_a_sigkill(
    anvil: Anvil, pg_dsn: str, tmp_path: Path
) -> None:
    with _logs_on_failure(tmp_path):
        await _three_instances_and_a_sigkill(anvil, pg_dsn, tmp_path)


async def _three_instances_and_a_sigkill(anvil: Anvil, pg_dsn: str, tmp_path: Path) -> None:
    dev = await setup_devchain(anvil.url, payers=60, signers=3)
    rpc = Rpc(anvil.url)
    before = (await balances(rpc, dev.token, [dev.payee]))[0]
    # deferred: /settle answers once durable; batches wait up to 1.5 s, so the killed
    # instance dies holding unbatched payments and, likely, a batch in flight
    policy = PolicyConfig(max_batch_size=50, max_wait_ms=1500)
    work = _work(dev, 300)
    everywhere = _work(dev, 20)  # each sent to all three instances at once
    async with cluster(dev, pg_dsn, 3, tmp_path, lease_s=2.0, policy=policy) as nodes:
        first = await post_spread(nodes, "/settle", [settle_body(*w) for w in work[:150]], 32)
        copies = [settle_body(*w) for w in everywhere for _ in nodes]
        echoed = await post_spread(nodes, "/settle", copies, 30)
        victim = nodes[1]
        victim.kill()
        killed_at = time.monotonic()
        second = await post_spread(nodes, "/settle", [settle_body(*w) for w in work[150:]], 32)
        states = await _until_all_final(pg_dsn, 90)
        takeover_s = time.monotonic() - killed_at
        with psycopg.connect(pg_dsn) as con:
            holders = [
                str(r[0])
                for r in con.execute(
                    "SELECT i.name FROM signer_leases l JOIN instances i ON i.id = l.instance_id"
                ).fetchall()
            ]
    answers = [a for a in first + second if a is not None]
    docs = [msgspec.json.decode(a.body) for a in answers]
    acknowledged = [d for d in docs if d.get("success")]
    assert len(acknowledged) >= 250, len(acknowledged)  # the victim's third of the tail fails
    # the identical payment at every instance: one success, the others duplicate_settlement
    for i in range(len(everywhere)):
        group = [msgspec.json.decode(a.body) for a in echoed[3 * i : 3 * i + 3] if a is not None]
        assert sum(1 for d in group if d.get("success")) == 1, group
        assert all(
            d.get("errorReason") == reasons.DUPLICATE_SETTLEMENT
            for d in group
            if not d.get("success")
        ), [(d.get("errorReason"), d.get("errorMessage")) for d in group]
    # every recorded payment is final and settled; each acknowledged one exactly once on chain
    assert set(states.values()) == {"settled"}, states
    paid = await _check_once_each(rpc, dev, work + everywhere)
    assert paid == len(states)  # what the ledger holds is exactly what moved
    assert len(states) >= len(acknowledged) + len(everywhere)
    received = (await balances(rpc, dev.token, [dev.payee]))[0] - before
    assert received == paid * VALUE
    with psycopg.connect(pg_dsn) as con:
        taken = con.execute("SELECT successor FROM instances WHERE name = 'i2'").fetchall()
    assert taken and taken[0][0] is not None  # a survivor took the killed instance over
    # ... and its signer account with it (read while serving: a clean stop frees leases)
    assert sorted(holders) in (["i1", "i1", "i3"], ["i1", "i3", "i3"]), holders
    assert takeover_s < 2.0 + 30, takeover_s
    await rpc.aclose()


async def test_a_postgres_restart_mid_load_loses_nothing_acknowledged(
    anvil: Anvil, postgres: PostgresServer, pg_dsn: str, tmp_path: Path
) -> None:
    with _logs_on_failure(tmp_path):
        await _postgres_restart(anvil, postgres, pg_dsn, tmp_path)


async def _postgres_restart(
    anvil: Anvil, postgres: PostgresServer, pg_dsn: str, tmp_path: Path
) -> None:
    dev = await setup_devchain(anvil.url, payers=40, signers=2)
    rpc = Rpc(anvil.url)
    before = (await balances(rpc, dev.token, [dev.payee]))[0]
    policy = PolicyConfig(max_batch_size=50, max_wait_ms=500)
    work = _work(dev, 200)
    async with cluster(dev, pg_dsn, 2, tmp_path, lease_s=10.0, policy=policy) as nodes:
        answers: list[Any] = []

        chunks = [[settle_body(*w) for w in work[at : at + 20]] for at in range(0, len(work), 20)]
        down, sent_while_down = trio.Event(), trio.Event()

        async def load() -> None:
            # before, during (at least one chunk, whatever the machine's speed) and after
            for i, bodies in enumerate(chunks):
                if i == len(chunks) // 2:
                    await down.wait()
                began_down = down.is_set()
                answers.extend(await post_spread(nodes, "/settle", bodies, 20))
                if began_down:
                    sent_while_down.set()
                await trio.sleep(0.1)

        async def restart() -> None:
            await trio.sleep(0.8)
            await trio.to_thread.run_sync(postgres.stop)
            down.set()
            with trio.move_on_after(30):
                await sent_while_down.wait()  # requests meanwhile must not be acknowledged
            await trio.to_thread.run_sync(postgres.start)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(load)
            nursery.start_soon(restart)
        states = await _until_all_final(pg_dsn, 90)
        assert all(n.process.returncode is None for n in nodes)  # both rode it out
    docs = [msgspec.json.decode(a.body) for a in answers if a is not None]
    acknowledged = [d for d in docs if d.get("success")]
    refused = [d for d in docs if not d.get("success")]
    assert refused, "the restart should have refused some requests"
    # ... each with an x402 answer that says why and that nothing was accepted
    assert all(d.get("errorReason") == reasons.UNEXPECTED_SETTLE for d in refused), refused[:3]
    assert all("not accepted" in d.get("errorMessage", "") for d in refused), refused[:3]
    assert set(states.values()) == {"settled"}, states
    paid = await _check_once_each(rpc, dev, work)
    assert paid == len(states) >= len(acknowledged)
    assert (await balances(rpc, dev.token, [dev.payee]))[0] - before == paid * VALUE
    await rpc.aclose()


def test_after_a_database_outage_no_instance_is_judged_silent_for_a_lease() -> None:
    from engine.cluster import may_take_over

    assert may_take_over(100.0, -math.inf, 10.0)  # never away: scan as usual
    assert not may_take_over(105.0, 100.0, 10.0)  # back 5 s ago: the others may not have beat
    assert may_take_over(110.0, 100.0, 10.0)  # a whole lease reachable: silence means silence
