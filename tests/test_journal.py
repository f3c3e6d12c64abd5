"""The write-ahead journal: acknowledged payments survive a crash before DuckDB holds them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from engine.store.journal import Journal, JournalCorrupt, JournalRow, decode_frames, encode_frame
from engine.store.ledger import Ledger

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
from engine.store.ledger import AsyncLedger, Ledger
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


def _three_frames(tmp_path: Path) -> tuple[Path, list[list[JournalRow]]]:
    journal = Journal(tmp_path / "j")
    groups = [[(k * 10 + i, _payment(), k) for i in range(1, 4)] for k in range(3)]
    for rows in groups:
        journal.append(encode_frame(rows), rows[-1][0])
    journal.close()
    return sorted((tmp_path / "j").iterdir())[0], groups


def test_a_damaged_frame_followed_by_intact_ones_stops_the_start(tmp_path: Path) -> None:
    segment, groups = _three_frames(tmp_path)
    data = bytearray(segment.read_bytes())
    data[len(encode_frame(groups[0])) + 20] ^= 0x01  # one bit, inside the second frame
    segment.write_bytes(bytes(data))
    with pytest.raises(JournalCorrupt, match="salvage"):
        Journal(tmp_path / "j").replay()
    assert segment.read_bytes() == bytes(data)  # nothing was cut or deleted


def test_salvage_keeps_every_intact_frame_and_sets_the_damage_aside(tmp_path: Path) -> None:
    segment, groups = _three_frames(tmp_path)
    data = bytearray(segment.read_bytes())
    data[len(encode_frame(groups[0])) + 20] ^= 0x01
    segment.write_bytes(bytes(data))
    journal = Journal(tmp_path / "j")
    rows, report = journal.salvage()
    assert rows == groups[0] + groups[2]
    assert report.frames == 2 and report.damaged_bytes == len(encode_frame(groups[1]))
    assert report.set_aside and all(p.exists() for p in report.set_aside)
    assert Journal(tmp_path / "j").replay() == []  # the damaged segment is out of the way


def test_a_zero_filled_tail_is_cut_like_a_torn_write(tmp_path: Path) -> None:
    segment, groups = _three_frames(tmp_path)
    with open(segment, "ab") as f:
        f.write(bytes(4096))  # a power loss that extended the file but wrote no data
    assert Journal(tmp_path / "j").replay() == [r for g in groups for r in g]
    assert segment.stat().st_size == sum(len(encode_frame(g)) for g in groups)


def test_settlement_ids_never_repeat_after_journal_loss(tmp_path: Path) -> None:
    path = tmp_path / "l.duckdb"
    ledger = Ledger(path)
    assert ledger.reserve_ids(3) >= 3  # the engine reserves before it hands out ids 1..3
    assert ledger.journal is not None
    ledger.journal.append(encode_frame([(i, _payment(), i) for i in (1, 2, 3)]), 3)
    ledger.journal.close()
    ledger._con.close()  # a crash: DuckDB never took those rows
    for segment in (tmp_path / "l.duckdb.journal").iterdir():
        segment.unlink()  # ... and the journal is lost (or salvaged without them)
    reopened = Ledger(path)
    assert reopened.query("SELECT count(*) FROM payments") == [(0,)]
    assert reopened.recover().next_payment_id > 3  # never 1, 2 or 3 again
    reopened.close()


def test_a_damaged_ledger_refuses_to_open_and_the_salvage_command_recovers_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "l.duckdb"
    Ledger(path).close()
    journal = Journal(tmp_path / "l.duckdb.journal")
    groups = [[(k * 10 + i, _payment(), k) for i in range(1, 4)] for k in range(3)]
    for rows in groups:
        journal.append(encode_frame(rows), rows[-1][0])
    journal.close()
    segment = sorted((tmp_path / "l.duckdb.journal").glob("*.seg"))[0]
    data = bytearray(segment.read_bytes())
    data[len(encode_frame(groups[0])) + 30] ^= 0x10
    segment.write_bytes(bytes(data))
    with pytest.raises(JournalCorrupt):
        Ledger(path)
    done = subprocess.run(
        [sys.executable, "-m", "engine.cli", "salvage-journal", "--ledger", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "2 intact frames, 6 payments recovered" in done.stdout, done.stdout
    ledger = Ledger(path)
    ids = [r[0] for r in ledger.query("SELECT id FROM payments ORDER BY id")]
    assert ids == [1, 2, 3, 21, 22, 23]
    assert ledger.recover().next_payment_id == 24
    ledger.close()
