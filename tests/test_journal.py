"""The write-ahead journal: acknowledged payments survive a crash before DuckDB holds them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from engine.journal import Journal, JournalCorrupt, decode_frames, encode_frame
from engine.ledger import Ledger

from .test_ledger import _payment

ROOT = Path(__file__).resolve().parent.parent


def test_frames_round_trip_values_beyond_64_bits() -> None:
    rows = [(1, _payment(2**128 - 1), 5), (2, _payment(0), 6)]
    decoded, end = decode_frames(encode_frame(rows) + encode_frame(rows[:1]))
    assert decoded == rows + rows[:1]
    assert end == len(encode_frame(rows)) + len(encode_frame(rows[:1]))


def test_torn_tail_is_cut_and_earlier_frames_survive(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j")
    good = [(1, _payment(), 1)]
    journal.append(encode_frame(good), 1)
    torn = encode_frame([(2, _payment(), 2)])
    journal.append(torn[: len(torn) // 2], 2)  # a crash in the middle of a write
    journal.close()
    reopened = Journal(tmp_path / "j")
    assert reopened.replay() == good
    segment = sorted((tmp_path / "j").iterdir())[0]
    assert segment.stat().st_size == len(encode_frame(good))  # the torn bytes are gone


def test_damage_before_the_newest_frame_stops_the_start(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j", segment_bytes_max=1 << 16)
    big = [(i, _payment(), i) for i in range(1, 400)]  # > 64 KiB: the next append rotates
    journal.append(encode_frame(big), 399)
    journal.append(encode_frame([(400, _payment(), 400)]), 400)
    journal.close()
    first = sorted((tmp_path / "j").iterdir())[0]
    data = bytearray(first.read_bytes())
    data[100] ^= 0xFF
    first.write_bytes(bytes(data))
    with pytest.raises(JournalCorrupt):
        Journal(tmp_path / "j").replay()


def test_closed_segments_are_deleted_once_the_ledger_holds_them(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j", segment_bytes_max=1 << 16)
    for k in range(3):
        rows = [(k * 400 + i, _payment(), 0) for i in range(1, 401)]
        journal.append(encode_frame(rows), rows[-1][0])
    assert journal.segment_count() == 3
    assert journal.release_through(400) == 1  # only the first closed segment is covered
    assert journal.segment_count() == 2
    assert journal.release_through(1200) == 1  # the open segment stays until it is closed
    assert journal.segment_count() == 1


def test_ledger_reads_see_staged_payments_and_close_empties_the_journal(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.duckdb")
    assert ledger.journal is not None
    rows = [(1, _payment(), 7), (2, _payment(), 8)]
    ledger.journal.append(encode_frame(rows), 2)
    ledger.stage(rows)
    assert ledger.query("SELECT count(*) FROM payments") == [(2,)]  # flushed before reading
    ledger.close()
    assert ledger.journal.segment_count() == 0
    reopened = Ledger(tmp_path / "l.duckdb")
    assert reopened.replayed == 0
    assert len(reopened.recover().open_payments) == 2
    reopened.close()


_CHILD = """
import sys, trio
from engine.ledger import AsyncLedger, Ledger
from tests.test_ledger import _payment

async def main(path):
    ledger = AsyncLedger(Ledger(path), flush_rows=10**9)  # nothing reaches DuckDB
    for group in range(10):
        rows = [(group * 50 + i, _payment(1000 + i), 0) for i in range(1, 51)]
        await ledger.record_accepted(rows)
        print("ACK", group, flush=True)
    print("DONE", flush=True)
    await trio.sleep_forever()

trio.run(main, sys.argv[1])
"""


def test_acknowledged_payments_survive_sigkill_before_any_duckdb_flush(tmp_path: Path) -> None:
    path = tmp_path / "ledger.duckdb"
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_CHILD), str(path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        lines: list[str] = []
        while not (lines and lines[-1].startswith(("DONE", "Traceback"))):
            line = child.stdout.readline()
            assert line, "the child exited early"
            lines.append(line)
        assert sum(line.startswith("ACK") for line in lines) == 10
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    ledger = Ledger(path)
    assert ledger.replayed == 500
    recovered = ledger.recover()
    assert [op.id for op in recovered.open_payments] == list(range(1, 501))
    assert {op.payment.value for op in recovered.open_payments} == set(range(1001, 1051))
    ledger.close()
