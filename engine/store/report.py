"""``x402-engine report``: what was accepted, settled and left uncollected, straight from the
ledger (DuckDB or PostgreSQL, or a running service's), grouped by day, payee, payer or status;
CSV and Parquet exports and a PNG of accepted versus settled value over time.

Amounts are exact: token base units as DECIMAL(38, 0) (never floats), gas as integers, fees in
wei. "Uncollected" is the value of payments that ended failed (an expired authorization, a payer
who spent or cancelled before the sweep). Run it on a ledger no engine has open (DuckDB allows one
writer per file: while ``serve`` runs, the CLI asks the service instead); opening it replays the
journal first, so nothing acknowledged is missing. The SQL is written once for both databases:
only the day key and integer division differ (:data:`DIALECTS`).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Literal, Protocol

GroupBy = Literal["day", "payee", "payer", "status"]
Dialect = Literal["duckdb", "postgres"]


class Source(Protocol):
    """Where a report reads from: a ledger, a read-only PostgreSQL client, a running service."""

    @property
    def dialect(self) -> Dialect: ...

    def query_with_columns(
        self, sql: str, params: list[Any] | None = None
    ) -> tuple[list[str], list[tuple[Any, ...]]]: ...


DIALECTS: dict[Dialect, dict[str, str]] = {
    "duckdb": {
        "day": "strftime(to_timestamp(accepted_at_ms / 1000), '%Y-%m-%d')",
        "div": "//",
    },
    "postgres": {
        "day": "to_char(to_timestamp(accepted_at_ms / 1000.0) AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
        "div": "/",  # both sides are integers (BIGINT, NUMERIC(38,0) truncated below)
    },
}

_CURRENT = """
WITH ranked AS (
    SELECT payment_id, state, reason, gas_used, fee_wei, at_ms,
           row_number() OVER (PARTITION BY payment_id ORDER BY seq DESC) AS rn
    FROM payment_events
), last AS (SELECT * FROM ranked WHERE rn = 1)
SELECT p.id, p.accepted_at_ms, p.chain_id, p.token, p.payer, p.payee, p.value,
       coalesce(last.state, 'accepted') AS state, last.reason, last.gas_used, last.fee_wei,
       last.at_ms AS final_at_ms
FROM payments p LEFT JOIN last ON last.payment_id = p.id
"""


def report_sql(group_by: GroupBy, dialect: Dialect = "duckdb") -> str:
    """One row per group: counts, exact amounts, gas and fee per settled payment."""
    key = {"payee": "payee", "payer": "payer", "status": "state"}.get(group_by)
    key = key or DIALECTS[dialect]["day"]
    div = DIALECTS[dialect]["div"]
    return f"""
    WITH cur AS ({_CURRENT})
    SELECT {key} AS {group_by},
           count(*) AS payments,
           count(*) FILTER (WHERE state = 'settled') AS settled,
           count(*) FILTER (WHERE state = 'failed') AS failed,
           count(*) FILTER (WHERE state NOT IN ('settled', 'failed')) AS pending,
           coalesce(sum(value), 0)::DECIMAL(38, 0) AS accepted_value,
           coalesce(sum(value) FILTER (WHERE state = 'settled'), 0)::DECIMAL(38, 0)
               AS settled_value,
           coalesce(sum(value) FILTER (WHERE state = 'failed'), 0)::DECIMAL(38, 0)
               AS uncollected_value,
           coalesce(sum(value) FILTER (WHERE state NOT IN ('settled', 'failed')), 0)
               ::DECIMAL(38, 0) AS pending_value,
           coalesce(sum(gas_used) FILTER (WHERE state = 'settled'), 0)::BIGINT AS gas_used,
           (coalesce(sum(gas_used) FILTER (WHERE state = 'settled'), 0)::BIGINT
               {div} greatest(count(*) FILTER (WHERE state = 'settled'), 1))::BIGINT
               AS gas_per_settled_payment,
           coalesce(sum(fee_wei) FILTER (WHERE state = 'settled'), 0)::DECIMAL(38, 0) AS fee_wei,
           trunc(coalesce(sum(fee_wei) FILTER (WHERE state = 'settled'), 0)::DECIMAL(38, 0)
               / greatest(count(*) FILTER (WHERE state = 'settled'), 1))::DECIMAL(38, 0)
               AS fee_wei_per_settled_payment
    FROM cur GROUP BY 1 ORDER BY 1
    """


def build_report(source: Source, group_by: GroupBy) -> tuple[list[str], list[tuple[Any, ...]]]:
    columns, rows = source.query_with_columns(report_sql(group_by, source.dialect))
    return columns, [tuple(_exact(v) for v in row) for row in rows]


def _exact(value: Any) -> Any:
    """Whole decimals as int (both databases return Decimal for DECIMAL(38, 0))."""
    if hasattr(value, "as_integer_ratio") and not isinstance(value, int | float):
        numerator, denominator = value.as_integer_ratio()
        if denominator == 1:
            return int(numerator)
    return value


def export(source: Source, group_by: GroupBy, path: Path, fmt: Literal["csv", "parquet"]) -> None:
    """Write the report as CSV or Parquet, amounts exact (Parquet: DECIMAL(38, 0))."""
    columns, rows = build_report(source, group_by)
    if fmt == "csv":
        with open(path, "w", newline="") as out:
            writer = csv.writer(out)
            writer.writerow(columns)
            writer.writerows(rows)
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays: list[Any] = []
    for i, name in enumerate(columns):
        values = [row[i] for row in rows]
        if name == group_by:
            arrays.append(pa.array([str(v) for v in values], pa.string()))
        else:
            arrays.append(pa.array([_decimal(v) for v in values], pa.decimal128(38, 0)))
    pq.write_table(pa.Table.from_arrays(arrays, names=columns), path)


def _decimal(value: Any) -> Any:
    import decimal

    return decimal.Decimal(int(value))


def value_over_time(source: Source) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(ms, value) of every acceptance and of every settlement, in time order."""
    _, rows = source.query_with_columns(
        f"WITH cur AS ({_CURRENT}) SELECT accepted_at_ms, value::VARCHAR, state, final_at_ms"
        " FROM cur"
    )
    accepted = sorted((int(r[0]), int(r[1])) for r in rows)
    settled = sorted((int(r[3]), int(r[1])) for r in rows if r[2] == "settled")
    return accepted, settled


def chart(source: Source, path: Path, decimals: int = 6) -> None:
    """PNG: cumulative accepted and settled value over time (whole tokens), hours from midnight
    UTC of the first acceptance."""
    import time

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    accepted, settled = value_over_time(source)
    origin_ms = (accepted[0][0] // 86_400_000) * 86_400_000 if accepted else 0
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for series, label in ((accepted, "accepted"), (settled, "settled")):
        total = 0
        xs: list[float] = []
        ys: list[float] = []
        for ms, value in series:
            total += value
            xs.append((ms - origin_ms) / 3_600_000)
            ys.append(total / 10**decimals)  # plotting only; reports stay in base units
        ax.step(xs, ys, where="post", label=label)
    day = time.strftime("%Y-%m-%d", time.gmtime(origin_ms / 1000))
    ax.set_xlabel(f"hours since {day} 00:00 UTC")
    ax.set_ylabel(f"cumulative value (tokens of {decimals} decimals)")
    ax.set_title("Accepted versus settled value")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table_width(cells: list[list[str]]) -> int:
    """Columns a boxed table of these cells (the header first) needs: each column its widest
    cell plus a border and two spaces of padding, and one closing border."""
    return sum(max(len(row[i]) for row in cells) + 3 for i in range(len(cells[0]))) + 1


def record_lines(columns: list[str], cells: list[str], width: int) -> list[str]:
    """One report row as a block for terminals too narrow for the table: the group on a line
    of its own, then ``name value`` pairs filled into lines of at most ``width`` columns."""
    lines = [cells[0]]
    line = " "
    for name, value in zip(columns[1:], cells[1:], strict=True):
        pair = f" {name} {value}"
        if len(line) + len(pair) > width and line.strip():
            lines.append(line)
            line = " "
        line += pair
    if line.strip():
        lines.append(line)
    return lines
