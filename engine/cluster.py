"""Many engine instances on one PostgreSQL ledger: opening the backend, membership, takeover.

Design (the README's deployment section explains it to operators):

- **Each instance batches what it accepted.** Accepted payments go straight into the accepting
  instance's in-memory batch pools, as with one instance; nothing polls a shared queue, so the
  hot path gains no database round trip beyond the intake group's commit. The database is the
  durable copy and the arbiter (replay keys, sales), not the queue.
- **Signers are leased.** An instance leases up to ``signers_per_instance`` of its configured
  accounts that no live instance holds, and sends only with those; each lease carries an epoch
  that every batch record is checked against (fencing).
- **Heartbeats and takeover.** Every instance renews its heartbeat and leases every
  ``lease_s / 4``; every ``lease_s / 2`` it looks for instances silent longer than ``lease_s``
  and takes them over (one survivor wins each: an atomic row update). Taking over an instance
  means its open work becomes the survivor's: sent-but-unconfirmed batches are rebroadcast and
  watched (as a restart does), payments in no batch are queued, their replay keys and sales
  loaded. The superseded instance, should it wake up, can no longer write (every write checks
  ``successor IS NULL`` under a share lock) and stops.
- **A restart resumes its own work at once**: an instance starting with the name of a stopped
  or silent one takes it over immediately, without waiting for the lease.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

import trio

from .config import ConfigError, EngineConfig
from .store.backend import LedgerBackend
from .store.ledger import AsyncLedger, Ledger

if TYPE_CHECKING:
    from .store.postgres import PgLedger

log = logging.getLogger("x402_engine.cluster")


def open_backend(config: EngineConfig, environ: Mapping[str, str] | None = None) -> LedgerBackend:
    """The configured ledger (blocking: call in a worker thread)."""
    ledger = config.ledger
    if ledger.backend == "duckdb":
        return Ledger(
            ledger.path,
            journal=ledger.journal,
            journal_segment_bytes_max=ledger.journal_segment_mb << 20,
        )
    from .store.postgres import PgLedger

    return PgLedger(dsn_from(config, environ), name=ledger.instance_name, lease_s=ledger.lease_s)


def dsn_from(config: EngineConfig, environ: Mapping[str, str] | None = None) -> str:
    """The PostgreSQL DSN, from the environment variable ``[ledger] dsn_env`` names (a DSN
    holds a password: it never appears in the configuration file, logs or errors)."""
    env = os.environ if environ is None else environ
    name = config.ledger.dsn_env
    dsn = env.get(name, "")
    if not dsn:
        raise ConfigError(
            f'[ledger] backend = "postgres" needs the DSN in the environment variable {name}'
            " (e.g. postgresql://user@db.internal:5432/x402)"
        )
    return dsn


class Membership:
    """An instance's life in the cluster: heartbeats (which renew signer leases) and the
    takeover of silent instances. ``adopt`` puts taken-over work in motion."""

    def __init__(
        self,
        ledger: AsyncLedger,
        shared: PgLedger,
        adopt: Callable[[list[int]], Awaitable[None]],
        sweep: Callable[[str | None], int],
    ) -> None:
        self._ledger = ledger
        self._shared = shared
        self._adopt = adopt
        self._sweep = sweep  # settle everything waiting (of a payee) now; returns how many
        self._last_command: int | None = None
        self.takeovers = 0
        self.taken: list[int] = []
        # set once the pipeline runs: heartbeats start at once (a long recovery must not look
        # like death), commands and takeovers only then
        self.ready = trio.Event()

    async def run(self) -> None:
        """Until cancelled; raises :class:`engine.store.postgres.Superseded` if another
        instance took this one over (it must stop: its work is that instance's now)."""
        import psycopg
        from psycopg_pool import PoolTimeout

        lease_s = self._shared.lease_s
        beat = lease_s / 4
        since_scan = 0.0
        back_since = -math.inf  # when the database answered again after an outage
        away = False
        self._last_command = await self._ledger.run(self._shared.last_command)
        while True:
            await trio.sleep(beat)
            try:
                await self._ledger.run_beside(self._shared.heartbeat)
                if away:
                    away, back_since = False, trio.current_time()
                if not self.ready.is_set():
                    continue
                await self._run_commands()
                since_scan += beat
                if since_scan < lease_s / 2:
                    continue
                since_scan = 0.0
                if not may_take_over(trio.current_time(), back_since, lease_s):
                    continue
                owners = await self._ledger.run_beside(self._shared.take_over)
            except (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout) as exc:
                # the database is away (a restart, a failover): keep trying
                log.warning("ledger database unreachable for the heartbeat: %s", exc)
                away = True
                continue
            if owners:
                self.takeovers += 1
                self.taken += owners
                await self._adopt(owners)

    async def _run_commands(self) -> None:
        """Operator commands from ``x402-engine sweep`` (every live instance runs each once)."""
        assert self._last_command is not None
        commands = await self._ledger.run_beside(self._shared.commands_since, self._last_command)
        for command_id, kind, payee in commands:
            waiting = self._sweep(payee) if kind == "sweep" else 0
            await self._ledger.run(self._shared.ack_command, command_id, waiting)
            self._last_command = command_id
            log.info("ran %s (payee %s): %d payments waiting", kind, payee or "all", waiting)


def may_take_over(now: float, back_since: float, lease_s: float) -> bool:
    """Whether to look for silent instances now. Every instance's heartbeat went stale while
    the database was away, through no fault of theirs: after an outage, wait a whole lease
    with the database reachable, so that the others can heartbeat again, before judging any
    of them silent (else the first one back takes the others over)."""
    return now - back_since >= lease_s
