"""The journal: what makes an acknowledgement durable, in well under a millisecond of disk time.

Accepted payments are appended to a segment file as one checksummed frame per intake group and
``fdatasync``'d before anyone is told; the DuckDB ledger takes them in bulk behind it (one commit
per flush instead of one per group, off the acknowledgement path). A DuckDB commit costs several
milliseconds here and more while the trio thread holds the GIL; an append and ``fdatasync`` of a
group costs about 0.3 ms (measured on this machine), which is what the acknowledgement tail
needs.

Layout: ``<ledger>.journal/`` holds ``<seq>.seg`` files. A frame is ``length (u32 LE) ||
crc32 (u32 LE) || msgpack rows`` (never empty). A segment is closed when it outgrows
``segment_bytes_max`` and deleted once the ledger holds every record in it. On open, every
frame is read back. Damage with no intact frame after it, at the end of the newest segment, is
a write a crash cut short (or a tail a power loss left zero-filled): it was never acknowledged
and is cut off. Damage anywhere else, or followed by any intact frame, is corruption: the start
stops and names the place; ``x402-engine salvage-journal`` then keeps every intact frame and sets
the damaged segment aside.

Thread-safety: :meth:`append` runs on one writer thread; :meth:`release_through` may run on
another (the ledger's); a lock guards the segment list.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from collections.abc import Sequence
from pathlib import Path

import msgspec

from ..model import Payment, PaymentTuple, payment_from_tuple, payment_to_tuple

log = logging.getLogger("x402_engine.journal")
_HEADER = struct.Struct("<II")
_SUFFIX = ".seg"

# (id, accepted_at_ms, payment)
_Row = tuple[int, int, PaymentTuple]
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(list[_Row])

JournalRow = tuple[int, Payment, int]  # (record id, payment, accepted_at_ms), as the ledger's


class JournalCorrupt(RuntimeError):
    """A damaged frame with intact frames after it (or in an older segment): refuse to start
    rather than lose acknowledged payments."""


_FRAME_BYTES_MAX = 1 << 26  # far above a group of group_max rows
_ARRAY_MARKERS = frozenset([*range(0x90, 0xA0), 0xDC, 0xDD])  # a msgpack array starts a body


class SalvageReport(msgspec.Struct):
    frames: int  # intact frames recovered
    rows: int
    damaged_bytes: int  # bytes skipped as damaged
    set_aside: list[Path]  # damaged segments, moved out of the journal (kept, not deleted)


def encode_frame(rows: Sequence[JournalRow]) -> bytes:
    """One checksummed frame holding ``rows`` (pure; runs on the caller's thread)."""
    body = _encoder.encode([(rid, at_ms, payment_to_tuple(p)) for rid, p, at_ms in rows])
    return _HEADER.pack(len(body), zlib.crc32(body)) + body


def _frame_at(data: bytes, offset: int) -> tuple[list[JournalRow], int] | None:
    """The rows of an intact frame at ``offset`` and where it ends, or None."""
    if offset + _HEADER.size > len(data):
        return None
    length, crc = _HEADER.unpack_from(data, offset)
    start = offset + _HEADER.size
    if length == 0 or length > _FRAME_BYTES_MAX or start + length > len(data):
        return None  # never written empty (a zero-filled tail passes the CRC otherwise)
    if data[start] not in _ARRAY_MARKERS:
        return None
    body = data[start : start + length]
    if zlib.crc32(body) != crc:
        return None
    try:
        decoded = _decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return [(rid, payment_from_tuple(t), at_ms) for rid, at_ms, t in decoded], start + length


def decode_frames(data: bytes) -> tuple[list[JournalRow], int]:
    """Rows of every intact frame from the start, and the offset where intact frames end."""
    rows: list[JournalRow] = []
    offset = 0
    while (found := _frame_at(data, offset)) is not None:
        rows.extend(found[0])
        offset = found[1]
    return rows, offset


def _next_intact(data: bytes, offset: int) -> int | None:
    """The offset of the first intact frame at or after ``offset`` (a byte-wise search, only
    ever run over damage)."""
    for at in range(offset, len(data) - _HEADER.size + 1):
        if _frame_at(data, at) is not None:
            return at
    return None


class Journal:
    """Append-only, fsync'd segments of accepted payments. Open, :meth:`replay`, then append."""

    def __init__(self, directory: Path, segment_bytes_max: int = 64 << 20) -> None:
        assert segment_bytes_max >= 1 << 16
        self.directory = directory
        self.segment_bytes_max = segment_bytes_max
        directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # Closed segments: (path, highest record id in it).
        self._closed: list[tuple[Path, int]] = []
        self._fd: int | None = None
        self._path: Path | None = None
        self._size = 0
        self._max_id = 0
        self._next_seq = 1 + max((_seq(p) for p in self._segments()), default=0)
        self.appended_bytes = 0
        self.syncs = 0

    def replay(self) -> list[JournalRow]:
        """Every durable row of every segment, oldest first. Cuts off a tail that a crash
        left unfinished; raises :class:`JournalCorrupt` for any other damage."""
        segments = self._segments()
        rows: list[JournalRow] = []
        for i, path in enumerate(segments):
            data = path.read_bytes()
            found, end = decode_frames(data)
            if end != len(data):
                intact_after = _next_intact(data, end + 1)
                if i != len(segments) - 1 or intact_after is not None:
                    where = (
                        f"an intact frame follows at byte {intact_after}"
                        if intact_after is not None
                        else "in an older segment"
                    )
                    raise JournalCorrupt(
                        f"journal segment {path} is damaged at byte {end} of {len(data)} ({where}):"
                        " acknowledged payments may be in it. Stop, copy the journal directory"
                        " aside, then run `x402-engine salvage-journal --config <engine.toml>` to"
                        " keep every intact frame (the damaged segment is moved to damaged/)"
                    )
                # A crash during the last append (or a zero-filled tail after a power loss):
                # that group was never acknowledged.
                log.warning(
                    "journal %s: cutting %d bytes of an unfinished last write",
                    path,
                    len(data) - end,
                )
                with open(path, "r+b") as f:
                    f.truncate(end)
                    os.fsync(f.fileno())
            rows.extend(found)
        return rows

    def salvage(self) -> tuple[list[JournalRow], SalvageReport]:
        """Every intact frame of every segment, skipping damage; damaged segments are moved to
        ``damaged/`` inside the journal directory (the caller writes the rows to the ledger)."""
        rows: list[JournalRow] = []
        frames = 0
        damaged = 0
        aside: list[Path] = []
        for path in self._segments():
            data = path.read_bytes()
            offset = 0
            skipped = 0
            while offset < len(data):
                found = _frame_at(data, offset)
                if found is not None:
                    rows.extend(found[0])
                    frames += 1
                    offset = found[1]
                    continue
                nxt = _next_intact(data, offset + 1)
                end = len(data) if nxt is None else nxt
                skipped += end - offset
                offset = end
            if skipped:
                damaged += skipped
                target = self.directory / "damaged" / path.name
                target.parent.mkdir(exist_ok=True)
                path.rename(target)
                aside.append(target)
        _sync_directory(self.directory)
        return rows, SalvageReport(frames, len(rows), damaged, aside)

    def reset(self) -> None:
        """Delete every segment (call once the ledger holds all their rows)."""
        with self._lock:
            self._close_current()
            for path in self._segments():
                path.unlink()
            self._closed.clear()
            _sync_directory(self.directory)

    def append(self, frame: bytes, max_id: int) -> None:
        """Write one frame and make it durable; ``max_id`` is its highest record id."""
        with self._lock:
            if self._fd is None or self._size >= self.segment_bytes_max:
                self._rotate()
            assert self._fd is not None
            try:
                written = os.write(self._fd, frame)
                while written < len(frame):  # a short write (rare): finish it
                    written += os.write(self._fd, frame[written:])
            except OSError:
                # Disk full or I/O error: cut the partial frame off so that later frames stay
                # readable, and tell the submitters (nothing of this group was acknowledged).
                os.ftruncate(self._fd, self._size)
                raise
            self._size += len(frame)
            self._max_id = max(self._max_id, max_id)
            fd = self._fd
        # Outside the lock: release_through must not wait on the disk.
        os.fdatasync(fd)
        self.appended_bytes += len(frame)
        self.syncs += 1

    def release_through(self, record_id: int) -> int:
        """Delete closed segments whose every record id is <= ``record_id``; returns how many."""
        with self._lock:
            keep = [(p, m) for p, m in self._closed if m > record_id]
            gone = [p for p, m in self._closed if m <= record_id]
            self._closed = keep
        for path in gone:
            path.unlink(missing_ok=True)
        return len(gone)

    def close(self) -> None:
        with self._lock:
            self._close_current()

    def segment_count(self) -> int:
        return len(self._segments())

    def _rotate(self) -> None:
        if self._fd is not None and self._path is not None:
            self._closed.append((self._path, self._max_id))
            self._close_current()
        self._path = self.directory / f"{self._next_seq:012d}{_SUFFIX}"
        self._next_seq += 1
        self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._size = 0
        self._max_id = 0
        _sync_directory(self.directory)  # the new file's name must survive a crash too

    def _close_current(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = None
        self._path = None

    def _segments(self) -> list[Path]:
        return sorted(self.directory.glob(f"*{_SUFFIX}"), key=_seq)


def _seq(path: Path) -> int:
    return int(path.name.removesuffix(_SUFFIX))


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
