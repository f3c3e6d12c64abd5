"""Pre-signed workloads, generated once with fast signing and cached on disk.

Benchmark chains are deployed from a fixed seed (``BENCH_SEED``), so the token, payers and payee
have the same addresses on every fresh anvil and a cached workload stays valid across runs until
its authorizations near expiry. Signing never runs inside a measurement.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import msgspec
from rich.progress import Progress

from engine.chain import crypto
from engine.dev.devchain import DevChain
from engine.model import hex_addr

BENCH_SEED = b"x402-engine-bench-v1"
CACHE_DIR = Path(os.environ.get("X402_BENCH_CACHE", ".bench-cache"))
VALID_FOR_S = 3 * 24 * 3600
REFRESH_BEFORE_S = 24 * 3600  # re-sign when less than a day of validity is left


class Workload(msgspec.Struct):
    chain_id: int
    token: str
    payee: str
    value: int
    valid_before: int
    bodies: list[bytes]  # facilitator request bodies, JSON


def _request(chain_id: int, token: str, payee: str, value: int) -> dict[str, object]:
    return {
        "scheme": "exact",
        "network": f"eip155:{chain_id}",
        "amount": str(value),
        "asset": token,
        "payTo": payee,
        "maxTimeoutSeconds": 300,
        "extra": {"name": "USD Coin", "version": "2"},
    }


def sign_bodies(
    dev: DevChain, count: int, value: int, valid_before: int, progress: Progress | None = None
) -> list[bytes]:
    keys = dev.payer_key_bytes()
    payers = [crypto.private_key_address(k) for k in keys]
    payee = bytes.fromhex(dev.payee[2:])
    separator = dev.domain.separator
    req = _request(dev.chain_id, dev.token, dev.payee, value)
    encoder = msgspec.json.Encoder()
    task = progress.add_task("signing workload", total=count) if progress else None
    bodies: list[bytes] = []
    valid_after = 0
    for i in range(count):
        k = i % len(keys)
        nonce = os.urandom(32)
        digest = crypto.transfer_digest(
            separator, payers[k], payee, value, valid_after, valid_before, nonce
        )
        signature = crypto.sign_digest(keys[k], digest)
        payload = {
            "x402Version": 2,
            "accepted": req,
            "payload": {
                "signature": "0x" + signature.hex(),
                "authorization": {
                    "from": hex_addr(payers[k]),
                    "to": dev.payee,
                    "value": str(value),
                    "validAfter": str(valid_after),
                    "validBefore": str(valid_before),
                    "nonce": "0x" + nonce.hex(),
                },
            },
        }
        bodies.append(
            encoder.encode(
                {"x402Version": 2, "paymentPayload": payload, "paymentRequirements": req}
            )
        )
        if progress is not None and task is not None and i % 1000 == 999:
            progress.advance(task, 1000)
    if progress is not None and task is not None:
        progress.update(task, completed=count)
    return bodies


def cached_workload(
    dev: DevChain, count: int, value: int = 1000, progress: Progress | None = None
) -> list[bytes]:
    """``count`` signed payments spread over the devchain's payers, from the cache if there."""
    name = crypto.keccak256(
        f"{dev.chain_id}|{dev.token}|{dev.payee}|{len(dev.payer_keys)}|{dev.payer_keys[0]}".encode()
    ).hex()[:16]
    path = CACHE_DIR / f"workload-{name}-{count}-{value}.json"
    now = int(time.time())
    if path.exists():
        cached = msgspec.json.decode(path.read_bytes(), type=Workload)
        if cached.valid_before > now + REFRESH_BEFORE_S and len(cached.bodies) == count:
            return cached.bodies
    valid_before = now + VALID_FOR_S
    bodies = sign_bodies(dev, count, value, valid_before, progress)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    workload = Workload(dev.chain_id, dev.token, dev.payee, value, valid_before, bodies)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(msgspec.json.encode(workload))
    tmp.replace(path)
    return bodies
