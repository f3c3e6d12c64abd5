"""What the engine asks of a ledger: the interface both backends implement.

- :class:`engine.store.ledger.Ledger`: DuckDB and a write-ahead journal, one process (default).
- :class:`engine.store.postgres.PgLedger`: PostgreSQL, shared by many engine instances.

Every method is synchronous and called from a worker thread through
:class:`engine.store.ledger.AsyncLedger` (at most ``concurrency`` at once).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from ..model import BatchEvent, BatchRecord, Clash, Outcome, Payment, PaymentEvent, Recovered, Sale
from .journal import Journal, JournalRow, SalvageReport


class LedgerBackend(Protocol):
    concurrency: int
    instance_id: int  # 0: a single-process ledger
    replayed: int
    salvaged: SalvageReport | None

    @property
    def journal(self) -> Journal | None: ...

    # writes
    def stage(self, rows: Sequence[JournalRow]) -> int: ...
    def staged_count(self) -> int: ...
    def flush_staged(self) -> int: ...
    def insert_payments(
        self, rows: Sequence[JournalRow], credit: Mapping[int, int] | None = None
    ) -> dict[int, Clash]: ...
    def append_events(self, events: Sequence[PaymentEvent], at_ms: int) -> None: ...
    def record_batch_sent(
        self,
        batch: BatchRecord,
        events: Sequence[PaymentEvent],
        at_ms: int,
        lease_epoch: int | None = None,
    ) -> None: ...
    def record_batch_final(
        self, event: BatchEvent, events: Sequence[PaymentEvent], at_ms: int
    ) -> None: ...
    def reserve_payment_ids(self, count: int, at_ms: int = 0) -> tuple[int, int]: ...
    def record_replacement(
        self, batch_id: int, tx_hash: str, raw_tx: bytes, at_ms: int
    ) -> None: ...
    def record_sales(self, sales: Sequence[Sale], at_ms: int) -> set[int]: ...

    # reads
    def live_sales(
        self, valid_before_min: int, owners: Sequence[int] | None = None
    ) -> list[Sale]: ...
    def sale(self, payment_id: int) -> Sale | None: ...
    def recover(self, owners: Sequence[int] | None = None) -> Recovered: ...
    def live_final_payments(
        self, valid_before_min: int, owners: Sequence[int] | None = None
    ) -> list[tuple[int, Payment]]: ...
    def outcome(self, payment_id: int) -> Outcome | None: ...
    def history(self, payment_id: int) -> list[dict[str, Any]]: ...
    def query(self, sql: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]: ...
    def query_with_columns(
        self, sql: str, params: Sequence[Any] | None = None
    ) -> tuple[list[str], list[tuple[Any, ...]]]: ...
    def close(self) -> None: ...
