"""The official x402 SDK's facilitator behind a minimal HTTP front, for load comparisons.

    X402_SDK_FACILITATOR_KEY=0x... python -m benchmarks.sdk_facilitator \\
        --rpc-url http://127.0.0.1:8545 --chain-id 31337 \\
        --key-env X402_SDK_FACILITATOR_KEY [--env-file devchain/signer.env] \\
        [--v1-network anvil] --bind 127.0.0.1:4021

    python -m benchmarks.sdk_facilitator --engine-config devchain/engine.toml \\
        [--env-file devchain/signer.env] --bind 127.0.0.1:4021

Two modes, one front. By default everything that verifies and settles is the SDK's own: an
``x402FacilitatorSync`` with the exact EVM scheme registered through
``register_exact_evm_facilitator`` (``build_sdk_facilitator`` in ``benchmarks/sdk_reference.py``),
backed by a ``FacilitatorWeb3Signer``. With ``--engine-config PATH`` the ``x402FacilitatorSync``
is the same, but its ``exact`` mechanisms are ours: ``register_batched_exact_evm(facilitator,
EngineHandle(load_config(PATH), environ=...))`` (``engine/integrations/x402_sdk.py``), on every
network the configuration names (v2 ``eip155:<chain id>`` and its v1 names, e.g. the devchain's
``anvil``); the environment is the process's, overlaid with ``--env-file`` (the engine's signer
keys, e.g. the devchain's ``signer.env``); no SDK signer key is needed; the engine is stopped
when the server stops. This is what an operator who built a facilitator from the SDK gets by
swapping the one registration call: the SDK's request handling, the engine's batching. The
SDK calls the mechanism in the request's thread, which blocks on the engine while the engine
batches the concurrent requests' payments into one transaction.

This module only parses request bodies with the SDK's pydantic models and writes the SDK's
response models back, over the standard library's ``ThreadingHTTPServer`` (one thread per
connection, no asyncio), so that a load tool can drive it and our engine's facilitator service
with the same bodies on the same anvil. ``serve_facilitator_in_thread(facilitator, ...)`` puts
any ``x402FacilitatorSync`` behind it (tests); ``serve_in_thread`` / ``sdk_facilitator`` build
the SDK-mechanism one, ``engine_server`` the engine-mechanism one.

Routes (the wire form of the SDK's ``HTTPFacilitatorClient``):

- ``POST /verify``, ``POST /settle``: body ``{"x402Version": 1|2, "paymentPayload": ...,
  "paymentRequirements": ...}``. Answers 200 with the SDK's ``VerifyResponse`` /
  ``SettleResponse`` dumped by alias without the unset fields, e.g. ``{"isValid": true,
  "payer": "0x..."}`` or ``{"success": true, "payer": "0x...", "transaction": "0x...",
  "network": "eip155:31337"}``. A negative result (``isValid: false``, ``success: false``) is
  still 200, as the SDK's client expects. A body that does not parse: 400 ``{"error": ...}``;
  an exception raised inside the SDK (e.g. no scheme registered for the network): 500
  ``{"error": ...}``, logged.
- ``GET /supported``: the SDK facilitator's ``get_supported()`` dumped by alias.

Versions, the SDK's mechanism: ``register_exact_evm_facilitator`` registers v2 for
``eip155:<chain id>`` and the SDK's v1 mechanism for its fixed table of v1 network names
(``base``, ``base-sepolia``, ...), none of which is a local chain, and takes no v1 names.
``--v1-network NAME`` (``serve_in_thread(..., v1_networks=[...])``) also registers the SDK's v1
exact scheme for ``NAME`` and, because the SDK's v1 verify looks the chain id up in its
module-level ``V1_NETWORK_CHAIN_IDS`` table, adds ``NAME -> chain id`` there (the devchain's
engine configuration calls its chain ``anvil``). The engine's mechanism serves the v1 names of
its configuration (``network_names``) and needs no such table: it takes no ``--v1-network``.

Not rewritten, on purpose: the SDK's verify simulates ``transferWithAuthorization`` by passing
the authorization's ``from``/``to`` strings unchanged to web3, which rejects addresses that are
not EIP-55 checksummed, so a payload with lowercase ``from``/``to`` fails verify with
``invalid_exact_evm_transaction_simulation_failed`` (see ``sdk_wire_form`` in
``benchmarks/sdk_reference.py``). The SDK's own client sends checksummed addresses; a load tool
must send what a real client sends, and this front passes bodies to the SDK as they are. Note
that the SDK's client copies the requirements' ``payTo`` into ``to`` as given: a merchant whose
``payTo`` is lowercase gets payments the SDK's own facilitator refuses.

Other behaviours of the SDK's mechanism a comparison meets (left as they are; none applies in
the engine mode, whose ``verify`` and ``settle`` are the engine's): its settle does not
re-simulate (``simulate_in_settle=False``), so a payment settled twice is broadcast twice and
the second reverts on chain, answered ``{"success": false, "errorReason": "transaction_failed",
"transaction": <the reverted hash>}`` (gas spent); one settle is one transaction sent from one
key (nonces reserved under the signer's lock, ``eth_getTransactionCount`` "pending" per send)
and waited for; registering ``eip155:<chain id>`` matches every ``eip155:*`` network, so a
payment for another chain is a 200 ``network_mismatch``, not a 500; web3 keeps one HTTP session
to the RPC per thread, so each new client connection (a new handler thread) opens its own
connection to the node: load tools should keep their connections alive.

The facilitator's key: on a devchain (``engine/dev/devchain.py``) anvil starts with
``--accounts 1``, so exactly one of anvil's default mnemonic accounts is funded (index 0,
10,000 ETH), and the devchain uses none of them: its deployer, engine signers (``signer.env``,
``X402_SIGNER_KEY_<i>``), payers and payee are fresh keys it funds with ``anvil_setBalance``. The
SDK facilitator therefore sends from anvil's account 0 (``ANVIL_ACCOUNT_0_KEY``, the well-known
public test key; ``sdk_facilitator_key(dev)`` checks it is none of the devchain's keys), and both
facilitators can settle on one anvil at once without sharing a transaction nonce. The engine
mode sends from its configuration's signers, as ``x402-engine serve`` does: on one
configuration run the two one after the other, never at once, and give each its own
``[ledger] path`` (a ledger belongs to one engine at a time).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pydantic import BaseModel
from x402 import x402FacilitatorSync
from x402.mechanisms.evm import FacilitatorWeb3Signer
from x402.mechanisms.evm.exact.v1.facilitator import ExactEvmSchemeV1, ExactEvmSchemeV1Config
from x402.mechanisms.evm.v1.constants import V1_NETWORK_CHAIN_IDS
from x402.schemas import (
    PaymentPayload,
    PaymentPayloadV1,
    PaymentRequirements,
    PaymentRequirementsV1,
)

from engine.config import load_config, read_env_file
from engine.dev.devchain import DevChain
from engine.handle import EngineHandle
from engine.integrations.x402_sdk import register_batched_exact_evm

from .sdk_reference import build_sdk_facilitator

logger = logging.getLogger("benchmarks.sdk_facilitator")

# anvil's default mnemonic ("test test ... junk"), index 0: public test key, funded by anvil.
ANVIL_ACCOUNT_0_KEY = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"
ANVIL_ACCOUNT_0 = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
DEFAULT_KEY_ENV = "X402_SDK_FACILITATOR_KEY"
MAX_BODY_BYTES = 1 << 20

Payload = PaymentPayload | PaymentPayloadV1
Requirements = PaymentRequirements | PaymentRequirementsV1


def sdk_facilitator_key(dev: DevChain) -> str:
    """The SDK facilitator's key for ``dev``'s anvil: anvil's default account 0, which the
    devchain funds nothing with and signs nothing with (see the module docstring)."""
    used = {dev.deployer_key.lower(), *(k.lower() for k in dev.signer_keys + dev.payer_keys)}
    if ANVIL_ACCOUNT_0_KEY in used or dev.payee.lower() == ANVIL_ACCOUNT_0.lower():
        raise ValueError("anvil's account 0 is one of the devchain's own accounts")
    return ANVIL_ACCOUNT_0_KEY


class BadRequest(ValueError):
    """A request body that is not a facilitator request."""


def parse_request(body: bytes) -> tuple[Payload, Requirements]:
    """A ``/verify`` or ``/settle`` body as the SDK's models of its ``x402Version``."""
    try:
        obj = json.loads(body)
        if not isinstance(obj, dict):
            raise BadRequest("body is not a JSON object")
        version = obj.get("x402Version")
        payload: Payload
        requirements: Requirements
        if version == 2:
            payload = PaymentPayload.model_validate(obj["paymentPayload"])
            requirements = PaymentRequirements.model_validate(obj["paymentRequirements"])
        elif version == 1:
            payload = PaymentPayloadV1.model_validate(obj["paymentPayload"])
            requirements = PaymentRequirementsV1.model_validate(obj["paymentRequirements"])
        else:
            raise BadRequest(f"x402Version must be 1 or 2, not {version!r}")
    except KeyError as exc:
        raise BadRequest(f"missing {exc.args[0]}") from exc
    except (ValueError, TypeError) as exc:  # JSON, UTF-8 and pydantic validation errors
        raise BadRequest(str(exc)) from exc
    if payload.x402_version != version:
        # the SDK routes on the payload's own version
        raise BadRequest(f"paymentPayload.x402Version {payload.x402_version} != {version}")
    return payload, requirements


def wire(model: BaseModel) -> dict[str, Any]:
    """An SDK response model as its HTTP client reads it: camelCase, unset fields left out."""
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


class SdkFacilitatorServer(ThreadingHTTPServer):
    daemon_threads = True  # a stop abandons requests in flight (and idle keep-alive connections)
    request_queue_size = 1024  # the listen backlog: a load tool opens many connections at once

    def __init__(
        self, address: tuple[str, int], facilitator: x402FacilitatorSync, label: str
    ) -> None:
        super().__init__(address, _Handler)
        self.facilitator = facilitator
        self.label = label  # what verifies and settles, for the listening line

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"


class _Handler(BaseHTTPRequestHandler):
    server: SdkFacilitatorServer
    protocol_version = "HTTP/1.1"  # keep-alive, as the SDK's httpx client and load tools use
    timeout = 60  # an idle keep-alive connection's thread ends after this
    disable_nagle_algorithm = True  # headers and body are two writes: no delayed-ACK stall

    def log_message(self, format: str, *args: Any) -> None:
        pass  # no line per request (load); errors are logged through ``logger``

    def _answer(self, status: int, obj: object) -> None:
        data = json.dumps(obj, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != "/supported":
            self._answer(404, {"error": f"no route GET {self.path}"})
            return
        try:
            supported = self.server.facilitator.get_supported()
        except Exception as exc:
            logger.exception("SDK get_supported failed")
            self._answer(500, {"error": f"{type(exc).__name__}: {exc}"})
            return
        self._answer(200, wire(supported))

    def do_POST(self) -> None:
        route = self.path.split("?", 1)[0]
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True  # the body's end is unknown
            self._answer(411, {"error": "a Content-Length is required"})
            return
        if not 0 <= length <= MAX_BODY_BYTES:
            self.close_connection = True
            self._answer(413, {"error": f"body over {MAX_BODY_BYTES} bytes"})
            return
        body = self.rfile.read(length)
        if route not in ("/verify", "/settle"):
            self._answer(404, {"error": f"no route POST {self.path}"})
            return
        try:
            payload, requirements = parse_request(body)
        except BadRequest as exc:
            self._answer(400, {"error": str(exc)})
            return
        facilitator = self.server.facilitator
        result: BaseModel
        try:
            if route == "/verify":
                result = facilitator.verify(payload, requirements)
            else:
                result = facilitator.settle(payload, requirements)
        except Exception as exc:
            logger.exception("SDK %s raised", route[1:])
            self._answer(500, {"error": f"{type(exc).__name__}: {exc}"})
            return
        self._answer(200, wire(result))


def build_server(
    rpc_url: str,
    chain_id: int,
    key: str,
    host: str = "127.0.0.1",
    port: int = 0,
    v1_networks: Sequence[str] = (),
) -> tuple[SdkFacilitatorServer, Callable[[], None]]:
    """The bound (not yet serving) server and a function undoing the v1 name registrations."""
    facilitator, signer = build_sdk_facilitator(rpc_url, chain_id, key)
    added = _register_v1_names(facilitator, signer, chain_id, v1_networks)

    def forget_v1_names() -> None:
        for name in added:
            V1_NETWORK_CHAIN_IDS.pop(name, None)

    try:
        label = f"signer {signer.address}, chain {chain_id}"
        server = SdkFacilitatorServer((host, port), facilitator, label)
    except BaseException:
        forget_v1_names()
        raise
    return server, forget_v1_names


def _register_v1_names(
    facilitator: x402FacilitatorSync,
    signer: FacilitatorWeb3Signer,
    chain_id: int,
    names: Sequence[str],
) -> list[str]:
    """Register the SDK's v1 exact scheme for local v1 network names; returns the names added
    to the SDK's v1 chain-id table (process-wide)."""
    added: list[str] = []
    for name in names:
        known = V1_NETWORK_CHAIN_IDS.get(name)
        if known is None:
            V1_NETWORK_CHAIN_IDS[name] = chain_id
            added.append(name)
        elif known != chain_id:
            raise ValueError(f"the SDK knows v1 network {name!r} as chain {known}, not {chain_id}")
    if names:
        scheme = ExactEvmSchemeV1(signer, ExactEvmSchemeV1Config())
        facilitator.register_v1(list(names), scheme)
    return added


def engine_label(handle: EngineHandle) -> str:
    """The engine mode's part of the listening line: its networks and signers."""
    supported = handle.supported()
    networks = [k["network"] for k in supported["kinds"] if k["scheme"] == "exact"]
    signers = supported["signers"].get("eip155:*", [])
    return f"x402-engine mechanism, networks {' '.join(networks)}, signers {' '.join(signers)}"


def engine_server(
    config_path: str,
    env_file: str | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    environ: dict[str, str] | None = None,
) -> tuple[SdkFacilitatorServer, Callable[[], None]]:
    """The engine mode: the bound (not yet serving) server, an ``x402FacilitatorSync`` with
    our ``exact`` mechanisms registered on an engine started from ``config_path`` (environment:
    ``environ``, default the process's, overlaid with ``env_file``), and a function that stops
    the engine (call it after the server stopped)."""
    config = load_config(config_path)
    env = {**(os.environ if environ is None else environ), **read_env_file(env_file)}
    handle = EngineHandle(config, environ=env)
    try:
        facilitator = x402FacilitatorSync()
        register_batched_exact_evm(facilitator, handle)
        server = SdkFacilitatorServer((host, port), facilitator, engine_label(handle))
    except BaseException:
        handle.close()
        raise
    return server, handle.close


def _serve(
    server: SdkFacilitatorServer, after_stop: Callable[[], None]
) -> tuple[str, Callable[[], None]]:
    """Serve ``server`` in a background thread; returns its base URL and an idempotent stop
    that shuts it down, then calls ``after_stop``."""
    thread = threading.Thread(
        target=server.serve_forever, name="sdk-facilitator", kwargs={"poll_interval": 0.1}
    )
    try:
        thread.start()
    except BaseException:
        server.server_close()
        after_stop()
        raise
    stopped = threading.Lock()

    def stop() -> None:
        if not stopped.acquire(blocking=False):
            return  # already stopped
        try:
            server.shutdown()
            server.server_close()
            thread.join()
        finally:
            after_stop()

    return server.url, stop


def serve_facilitator_in_thread(
    facilitator: x402FacilitatorSync,
    host: str = "127.0.0.1",
    port: int = 0,
    label: str = "",
) -> tuple[str, Callable[[], None]]:
    """Any ``x402FacilitatorSync`` (whatever its mechanisms) behind this front, in a background
    thread; returns the base URL and a function that stops serving (the facilitator, and an
    engine behind its mechanisms, are the caller's to close)."""
    server = SdkFacilitatorServer((host, port), facilitator, label)
    return _serve(server, lambda: None)


def serve_in_thread(
    rpc_url: str,
    chain_id: int,
    key: str,
    host: str = "127.0.0.1",
    port: int = 0,
    v1_networks: Sequence[str] = (),
) -> tuple[str, Callable[[], None]]:
    """The SDK's mechanism, served in a background thread; returns the base URL and a
    function that stops it."""
    server, forget_v1_names = build_server(rpc_url, chain_id, key, host, port, v1_networks)
    return _serve(server, forget_v1_names)


@contextmanager
def sdk_facilitator(
    rpc_url: str,
    chain_id: int,
    key: str,
    host: str = "127.0.0.1",
    port: int = 0,
    v1_networks: Sequence[str] = (),
) -> Iterator[str]:
    """``serve_in_thread`` as a context manager yielding the base URL."""
    url, stop = serve_in_thread(rpc_url, chain_id, key, host, port, v1_networks)
    try:
        yield url
    finally:
        stop()


def _parse_bind(bind: str) -> tuple[str, int]:
    host, sep, port = bind.rpartition(":")
    if not sep or not host:
        raise ValueError(f"--bind wants HOST:PORT, not {bind!r}")
    return host.strip("[]"), int(port)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.sdk_facilitator",
        description="The official x402 SDK's facilitator over HTTP (for load comparisons).",
    )
    parser.add_argument("--rpc-url", help="the SDK mode's node (not with --engine-config)")
    parser.add_argument("--chain-id", type=int, help="the SDK mode's chain (the same)")
    parser.add_argument(
        "--engine-config",
        default=None,
        metavar="PATH",
        help="the engine mode: the SDK's facilitator with x402-engine's exact mechanism, on the "
        "engine this configuration describes (its signer keys from the environment and "
        "--env-file)",
    )
    parser.add_argument(
        "--key-env",
        default=DEFAULT_KEY_ENV,
        help="environment variable holding the facilitator's private key (on a devchain: "
        "anvil's account 0, not one of signer.env's keys)",
    )
    parser.add_argument(
        "--env-file", default=None, help="KEY=VALUE file overlaid on the environment"
    )
    parser.add_argument("--bind", default="127.0.0.1:4021", help="HOST:PORT")
    parser.add_argument(
        "--v1-network",
        action="append",
        default=[],
        help="also serve v1 payloads naming the chain so (repeatable; the devchain's is anvil)",
    )
    args = parser.parse_args(argv)
    rpc_url: str | None = args.rpc_url
    chain_id: int | None = args.chain_id
    if args.engine_config is not None:
        if rpc_url is not None or chain_id is not None or args.v1_network:
            parser.error(
                "--engine-config takes its chains from the configuration: no --rpc-url, "
                "--chain-id or --v1-network"
            )
    elif rpc_url is None or chain_id is None:
        parser.error("--rpc-url and --chain-id are required (or --engine-config)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per RPC request otherwise
    try:
        host, port = _parse_bind(args.bind)
        if args.engine_config is not None:
            mode = "sdk facilitator + x402-engine mechanism"
            server, after_stop = engine_server(args.engine_config, args.env_file, host, port)
        else:
            mode = "sdk facilitator"
            assert rpc_url is not None and chain_id is not None  # checked above
            environ = {**os.environ, **read_env_file(args.env_file)}
            key = environ.get(args.key_env, "").strip()
            if not key:
                print(f"sdk_facilitator: {args.key_env} is not set", file=sys.stderr)
                return 2
            server, after_stop = build_server(rpc_url, chain_id, key, host, port, args.v1_network)
    except Exception as exc:
        print(f"sdk_facilitator: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    thread = threading.Thread(
        target=server.serve_forever, name="sdk-facilitator", kwargs={"poll_interval": 0.1}
    )
    thread.start()
    # The SDK mode's line is "sdk facilitator listening on URL (signer 0x..., chain N)".
    print(f"{mode} listening on {server.url} ({server.label})", flush=True)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        try:
            server.shutdown()
            server.server_close()
            thread.join()
        finally:
            after_stop()  # the engine mode stops the engine here
    return 0


if __name__ == "__main__":
    sys.exit(main())
