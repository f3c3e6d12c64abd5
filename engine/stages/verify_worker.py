"""A verify worker process: the ingest checks of ``verify.py`` on another core.

    python -c "from engine.stages.verify_worker import main; main()"   (started by the VerifyPool)

Speaks length-prefixed msgpack frames on stdin/stdout. The first frame in is the engine's
configuration (JSON bytes); the worker answers ``READY``. Every later frame in is a batch
``(now, [(payload_json, requirements_json), ...])``; the answer is one result per item, in
order: ``(payment_tuple, None)`` or ``(None, (reason, message, payer))``. Signature recovery
in C dominates, so a batch of a few hundred keeps the framing cost per payment under a
microsecond. The clock stays in the engine: ``now`` travels with each batch.
"""

from __future__ import annotations

import struct
import sys
from typing import BinaryIO

import msgspec

from ..config import EngineConfig, validate
from ..model import PaymentTuple, payment_to_tuple
from .verify import Verifier

LENGTH = struct.Struct("<I")
READY = b"READY"
FRAME_BYTES_MAX = 256 << 20

Request = tuple[float, list[tuple[bytes, bytes]]]
Result = tuple[PaymentTuple | None, tuple[str, str, str | None] | None]
request_encoder = msgspec.msgpack.Encoder()
request_decoder = msgspec.msgpack.Decoder(Request)
result_decoder = msgspec.msgpack.Decoder(list[Result])


def frame(body: bytes) -> bytes:
    assert len(body) <= FRAME_BYTES_MAX
    return LENGTH.pack(len(body)) + body


def _read_exactly(stream: BinaryIO, n: int) -> bytes | None:
    data = stream.read(n)
    if not data:
        return None
    while len(data) < n:
        more = stream.read(n - len(data))
        if not more:
            raise EOFError("verify worker: truncated frame")
        data += more
    return data


def read_frame(stream: BinaryIO) -> bytes | None:
    header = _read_exactly(stream, LENGTH.size)
    if header is None:
        return None
    (length,) = LENGTH.unpack(header)
    if length > FRAME_BYTES_MAX:
        raise ValueError(f"verify worker: frame of {length} bytes")
    body = _read_exactly(stream, length) if length else b""
    if body is None:
        raise EOFError("verify worker: truncated frame")
    return body


def check_batch(verifier: Verifier, body: bytes) -> bytes:
    """One request frame's body in, one answer frame's body out (pure)."""
    now, items = request_decoder.decode(body)
    results: list[Result] = []
    for payload, requirements in items:
        payment, rejected = verifier.check(payload, requirements, now)
        # both may be set: a signature left to the chain (the rejection says so) keeps its payment
        results.append(
            (
                None if payment is None else payment_to_tuple(payment),
                None if rejected is None else (rejected.reason, rejected.message, rejected.payer),
            )
        )
    return request_encoder.encode(results)


def serve(stdin: BinaryIO, stdout: BinaryIO) -> None:
    first = read_frame(stdin)
    if first is None:
        return
    verifier = Verifier(validate(msgspec.json.decode(first, type=EngineConfig)))
    stdout.write(frame(READY))
    stdout.flush()
    while (body := read_frame(stdin)) is not None:
        stdout.write(frame(check_batch(verifier, body)))
        stdout.flush()


def main() -> None:
    serve(sys.stdin.buffer, sys.stdout.buffer)
