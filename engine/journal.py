"""The journal: what makes an acknowledgement durable, in well under a millisecond of disk time.

Accepted payments are appended to a segment file as one checksummed frame per intake group and
``fdatasync``'d before anyone is told; the DuckDB ledger takes them in bulk behind it (one commit
per flush instead of one per group, off the acknowledgement path). A DuckDB commit costs several
milliseconds here and more while the trio thread holds the GIL; an append and ``fdatasync`` of a
group costs about 0.3 ms (measured on this machine), which is what the acknowledgement tail
needs.

Layout: ``<ledger>.journal/`` holds ``<seq>.seg`` files. A frame is ``length (u32 LE) ||
crc32 (u32 LE) || msgpack rows``. A segment is closed when it outgrows ``segment_bytes_max``
and deleted once the ledger holds every record in it. On open, every frame is read back: a torn
frame at the very end of the newest segment (a crash mid-write, never acknowledged) is cut off;
a bad frame anywhere else is corruption and stops the start-up.

Thread-safety: :meth:`append` runs on one writer thread; :meth:`release_through` may run on
another (the ledger's); a lock guards the segment list.
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from collections.abc import Sequence
from pathlib import Path

import msgspec

from .model import Payment, PaymentTuple, payment_from_tuple, payment_to_tuple

_HEADER = struct.Struct("<II")
_SUFFIX = ".seg"

# (id, accepted_at_ms, payment)
_Row = tuple[int, int, PaymentTuple]
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(list[_Row])

JournalRow = tuple[int, Payment, int]  # (record id, payment, accepted_at_ms), as the ledger's


class JournalCorrupt(RuntimeError):
    """A frame other than the newest one is damaged: refuse to start rather than lose it."""


def encode_frame(rows: Sequence[JournalRow]) -> bytes:
    """One checksummed frame holding ``rows`` (pure; runs on the caller's thread)."""
    body = _encoder.encode([(rid, at_ms, payment_to_tuple(p)) for rid, p, at_ms in rows])
    return _HEADER.pack(len(body), zlib.crc32(body)) + body


def decode_frames(data: bytes) -> tuple[list[JournalRow], int]:
    """Rows of every intact frame, and the offset where intact frames end."""
    rows: list[JournalRow] = []
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, crc = _HEADER.unpack_from(data, offset)
        start = offset + _HEADER.size
        body = data[start : start + length]
        if len(body) < length or zlib.crc32(body) != crc:
            break
        rows.extend((rid, payment_from_tuple(t), at_ms) for rid, at_ms, t in _decoder.decode(body))
        offset = start + length
    return rows, offset


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
        """Every durable row of every segment, oldest first (cuts a torn tail off)."""
        segments = self._segments()
        rows: list[JournalRow] = []
        for i, path in enumerate(segments):
            data = path.read_bytes()
            found, end = decode_frames(data)
            if end != len(data):
                if i != len(segments) - 1:
                    raise JournalCorrupt(f"{path}: damaged frame at byte {end} of {len(data)}")
                # A crash during the last append: that group was never acknowledged.
                with open(path, "r+b") as f:
                    f.truncate(end)
                    os.fsync(f.fileno())
            rows.extend(found)
        return rows

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
