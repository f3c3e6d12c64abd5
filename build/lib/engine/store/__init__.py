"""The system of record: the DuckDB ledger, the write-ahead journal, reports."""
