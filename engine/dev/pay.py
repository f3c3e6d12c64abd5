"""``x402-engine pay``: sign x402 ``exact`` payments (EIP-3009) and send them to any facilitator
(``/verify`` then ``/settle``, as a resource server does) or to any x402 resource server (its
402, then the paid retry): one payment for a walkthrough, or a bounded load. Afterwards the chain
is asked which accepted payments landed, in how many transactions, for how much gas: the token's
``AuthorizationUsed`` logs, so the figures mean the same for every facilitator.

Wire forms follow the official clients: addresses in EIP-55 checksum case (the SDK's
facilitator refuses lowercase ones), v2 payloads in the ``PAYMENT-SIGNATURE`` header and v1 in
``X-PAYMENT`` (base64 JSON), amounts as decimal strings.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import httpx
import msgspec
import trio
from eth_utils.address import to_checksum_address

from ..chain import crypto
from ..chain.rpc import Rpc
from ..clock import Clock, SystemClock
from ..config import ConfigError
from .devchain import DevChain
from .loadgen import TokenDomain, sign_authorization
from .paystats import Answer, ChainView, Shape, Summary, settle_verdict, summarize, verify_verdict

# keccak("AuthorizationUsed(address,bytes32)"): EIP-3009 tokens log it once per used nonce
AUTHORIZATION_USED = "0x98de503528ee59b575ef0c0a2576a82497bfc029a5685b209e9ec333479b10a5"
LOCAL_CHAINS = frozenset({31337, 1337})  # anvil, hardhat/ganache: no real funds
CONNECTIONS_PER_CLIENT = 8
VALID_BEFORE_SKEW_S = 600  # validAfter this far back: the payer's clock may run ahead of blocks


class Payers(msgspec.Struct):
    """Who signs: private keys, and the chain they pay on."""

    keys: list[bytes]
    rpc_url: str
    source: str  # where the keys came from, for the output


class Price(msgspec.Struct):
    """What each payment pays, and how it travels."""

    domain: TokenDomain  # the token and its EIP-712 domain
    pay_to: bytes
    amount: int
    version: Literal[1, 2]
    network: str  # "eip155:<id>" (v2) or the facilitator's v1 name
    max_timeout_s: int = 300
    accepted: dict[str, Any] | None = None  # a resource server's own requirements, verbatim
    resource: Any = None  # and its v2 resource description


class Target(msgspec.Struct):
    url: str
    kind: Literal["facilitator", "resource"]
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    verify: bool = True  # facilitator: /verify before /settle


class Paid(msgspec.Struct, frozen=True):
    """One signed payment: what goes on the wire, and how the chain will know it."""

    payer: bytes
    nonce: bytes
    body: bytes  # the facilitator request, or the header value for a resource server
    settled: bool = False  # answered settled with a transaction: it must be on chain


class PayRun(msgspec.Struct):
    summary: Summary
    answers: list[Answer]
    first_payer: str


# ------------------------------------------------------------------------------ who pays


def load_devchain(directory: str) -> tuple[DevChain, Path]:
    """A devchain's ``devchain.json`` (what ``x402-engine devchain --out DIR`` wrote)."""
    path = Path(directory) / "devchain.json"
    try:
        return msgspec.json.decode(path.read_bytes(), type=DevChain), path
    except FileNotFoundError:
        raise ConfigError(f"no {path}: run x402-engine devchain --out {directory} first") from None
    except (OSError, msgspec.DecodeError) as exc:
        raise ConfigError(f"{path} is not a devchain's file: {exc}") from None


def payers_from_devchain(
    dev: DevChain, path: Path, rpc_url: str | None, limit: int | None
) -> Payers:
    keys = dev.payer_key_bytes()[:limit]
    return Payers(keys, rpc_url or dev.rpc_url, f"{len(keys)} devchain payers ({path})")


def payers_from_key_file(path: str, rpc_url: str | None, limit: int | None) -> Payers:
    """One 0x-hex private key per line; blank lines and # comments skipped."""
    if rpc_url is None:
        raise ConfigError("--key-file needs --rpc (the chain the payers pay on)")
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read the key file: {exc}") from None
    keys: list[bytes] = []
    for n, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            key = bytes.fromhex(text.removeprefix("0x"))
        except ValueError:
            key = b""
        if len(key) != 32:
            raise ConfigError(f"{path} line {n}: not a 32-byte hex private key")
        keys.append(key)
    if not keys:
        raise ConfigError(f"{path}: no keys")
    return Payers(keys[:limit], rpc_url, f"{len(keys[:limit])} keys from {path}")


def devchain_price(dev: DevChain, amount: int, pay_to: str | None) -> Price:
    payee = _address(pay_to or dev.payee, "--pay-to")
    return Price(dev.domain, payee, amount, 2, f"eip155:{dev.chain_id}")


async def token_price(rpc: Rpc, chain_id: int, asset: str, pay_to: str, amount: int) -> Price:
    """The token's EIP-712 name and version read from the chain (``name()``, ``version()``)."""
    token = _address(asset, "--asset")
    texts: list[str] = []
    for selector in ("0x06fdde03", "0x54fd4d50"):  # name(), version()
        try:
            raw = bytes.fromhex(
                (
                    await rpc.call(
                        "eth_call", [{"to": "0x" + token.hex(), "data": selector}, "latest"]
                    )
                )[2:]
            )
            length = int.from_bytes(raw[32:64], "big")
            texts.append(raw[64 : 64 + length].decode())
        except Exception as exc:
            raise ConfigError(f"{asset} does not answer name()/version(): {exc}") from None
    domain = TokenDomain(chain_id, token, texts[0], texts[1])
    return Price(domain, _address(pay_to, "--pay-to"), amount, 2, f"eip155:{chain_id}")


def _address(text: str, what: str) -> bytes:
    raw = bytes.fromhex(text.removeprefix("0x")) if len(text) == 42 else b""
    if len(raw) != 20:
        raise ConfigError(f"{what}: {text!r} is not a 0x address")
    return raw


# ------------------------------------------------------------------------- discovery


async def await_facilitator(
    client: httpx.AsyncClient, url: str, patience_s: float, say: Callable[[str], None]
) -> dict[str, Any]:
    """``GET /supported``, retried while nothing listens yet (a service still starting)."""
    deadline = trio.current_time() + patience_s
    told = False
    while True:
        try:
            answer = await client.get(url.rstrip("/") + "/supported")
            break
        except httpx.TransportError:
            if trio.current_time() > deadline:
                raise ConfigError(
                    f"nothing answers at {url} (waited {patience_s:g} s): is the facilitator"
                    " running?"
                ) from None
            if not told:
                say(f"waiting for {url} to answer")
                told = True
            await trio.sleep(0.25)
    if answer.status_code != 200:
        raise ConfigError(
            f"{url}/supported answered HTTP {answer.status_code}: {answer.text[:200]}"
        )
    doc = answer.json()
    if not isinstance(doc, dict):
        raise ConfigError(f"{url}/supported is not a /supported document")
    return doc


def choose_network(
    supported: dict[str, Any], chain_id: int, version: int, network: str | None
) -> str:
    """The network name to pay on, from the facilitator's ``/supported`` kinds."""
    kinds = [
        k
        for k in supported.get("kinds", [])
        if isinstance(k, dict) and k.get("scheme") == "exact" and k.get("x402Version") == version
    ]
    names = [str(k.get("network")) for k in kinds]
    if network is not None:
        wanted = network
    elif version == 2:
        wanted = f"eip155:{chain_id}"
    elif len(names) == 1:
        wanted = names[0]
    else:
        raise ConfigError(f"choose a v1 network with --network (the facilitator lists {names})")
    if wanted not in names:
        raise ConfigError(
            f"the facilitator does not settle exact x402 v{version} payments on {wanted}"
            f" (it lists: {', '.join(names) or 'none'})"
        )
    return wanted


async def read_402(
    client: httpx.AsyncClient,
    url: str,
    chain_id: int,
    patience_s: float,
    say: Callable[[str], None],
) -> Price:
    """A resource server's price: GET it unpaid, read the 402 (v2 ``PAYMENT-REQUIRED`` header,
    else a v1 JSON body) and pick the ``exact`` EIP-3009 offer on our chain."""
    deadline = trio.current_time() + patience_s
    while True:
        try:
            answer = await client.get(url)
            break
        except httpx.TransportError:
            if trio.current_time() > deadline:
                raise ConfigError(f"nothing answers at {url} (waited {patience_s:g} s)") from None
            say(f"waiting for {url} to answer")
            await trio.sleep(0.25)
    if answer.status_code != 402:
        raise ConfigError(f"{url} answered HTTP {answer.status_code}, not 402 Payment Required")
    header = answer.headers.get("payment-required")
    try:
        doc = json.loads(base64.b64decode(header)) if header else answer.json()
    except ValueError:
        raise ConfigError(f"{url}: the 402 carries no x402 payment requirements") from None
    version = doc.get("x402Version") if isinstance(doc, dict) else None
    if version not in (1, 2):
        raise ConfigError(f"{url}: the 402 carries no x402 payment requirements")
    for offer in doc.get("accepts") or []:
        if not isinstance(offer, dict) or offer.get("scheme") != "exact":
            continue
        extra = offer.get("extra") or {}
        if extra.get("assetTransferMethod", "eip3009") != "eip3009":
            continue
        if version == 2 and offer.get("network") != f"eip155:{chain_id}":
            continue
        try:
            amount = int(offer["amount"] if version == 2 else offer["maxAmountRequired"])
            token = _address(str(offer["asset"]), "asset")
            domain = TokenDomain(chain_id, token, str(extra["name"]), str(extra["version"]))
            pay_to = _address(str(offer["payTo"]), "payTo")
        except (KeyError, ValueError, ConfigError):
            continue
        return Price(
            domain,
            pay_to,
            amount,
            version,
            str(offer.get("network")),
            int(offer.get("maxTimeoutSeconds") or 300),
            accepted=offer,
            resource=doc.get("resource"),
        )
    raise ConfigError(f"{url} offers no exact EIP-3009 payment on chain {chain_id}")


# ---------------------------------------------------------------------------- signing


def _checksum(hex_address: str) -> str:
    return str(to_checksum_address(hex_address))


def requirements(price: Price) -> dict[str, Any]:
    if price.accepted is not None:
        return price.accepted
    common = {
        "scheme": "exact",
        "network": price.network,
        "asset": _checksum("0x" + price.domain.address.hex()),
        "payTo": _checksum("0x" + price.pay_to.hex()),
        "maxTimeoutSeconds": price.max_timeout_s,
        "extra": {"name": price.domain.name, "version": price.domain.version},
    }
    if price.version == 2:
        return {**common, "amount": str(price.amount)}
    return {
        **common,
        "maxAmountRequired": str(price.amount),
        "resource": "http://127.0.0.1/x402-engine-pay",
        "description": "",
        "mimeType": "",
    }


def sign(price: Price, key: bytes, now: int, *, for_resource: bool) -> Paid:
    """One freshly signed payment (a random nonce) as a facilitator request body, or, for a
    resource server, the payment header's value."""
    payload = sign_authorization(
        price.domain,
        key,
        price.pay_to,
        price.amount,
        now - VALID_BEFORE_SKEW_S,
        now + price.max_timeout_s,
    )
    wire = msgspec.to_builtins(payload)
    wire["authorization"]["from"] = _checksum(wire["authorization"]["from"])
    wire["authorization"]["to"] = _checksum(wire["authorization"]["to"])
    req = requirements(price)
    if price.version == 2:
        envelope: dict[str, Any] = {"x402Version": 2, "accepted": req, "payload": wire}
        if price.resource is not None:
            envelope["resource"] = price.resource
    else:
        envelope = {"x402Version": 1, "scheme": "exact", "network": price.network, "payload": wire}
    payer = crypto.private_key_address(key)
    nonce = bytes.fromhex(wire["authorization"]["nonce"][2:])
    if for_resource:
        return Paid(payer, nonce, base64.b64encode(json.dumps(envelope).encode()))
    body = {"x402Version": price.version, "paymentPayload": envelope, "paymentRequirements": req}
    return Paid(payer, nonce, json.dumps(body, separators=(",", ":")).encode())


# ---------------------------------------------------------------------------- sending


async def pay_facilitator(client: httpx.AsyncClient, target: Target, paid: Paid) -> Answer:
    """``/verify`` (unless skipped), then ``/settle``; latency is filled in by the caller."""
    base = target.url.rstrip("/")
    headers = {"content-type": "application/json"}
    if target.verify:
        answer = await client.post(base + "/verify", content=paid.body, headers=headers)
        reason = verify_verdict(_json(answer))
        if reason == "not_a_verify_response":
            return Answer("error", 0.0, f"verify_http_{answer.status_code}")
        if reason is not None:
            return Answer("rejected", 0.0, reason)
    answer = await client.post(base + "/settle", content=paid.body, headers=headers)
    verdict, reason, transaction, settlement_id = settle_verdict(_json(answer))
    if verdict == "error":
        reason = f"settle_http_{answer.status_code}"
    return Answer(verdict, 0.0, reason, transaction, settlement_id)


async def pay_resource(
    client: httpx.AsyncClient, target: Target, paid: Paid, version: int
) -> Answer:
    """The paid retry: 200 with a settlement response header, else why not."""
    header = "PAYMENT-SIGNATURE" if version == 2 else "X-PAYMENT"
    answer = await client.get(target.url, headers={header: paid.body.decode()})
    if answer.status_code == 200:
        said = answer.headers.get("payment-response") or answer.headers.get("x-payment-response")
        transaction = ""
        if said:
            with contextlib.suppress(ValueError):
                transaction = str(json.loads(base64.b64decode(said)).get("transaction") or "")
        return Answer("settled" if transaction else "accepted", 0.0, "", transaction)
    if answer.status_code == 402:
        header_doc = answer.headers.get("payment-required")
        try:
            doc = json.loads(base64.b64decode(header_doc)) if header_doc else answer.json()
            reason = str(doc.get("error") or "payment_required")
        except (ValueError, AttributeError):  # not JSON, or not an object
            reason = "payment_required"
        return Answer("rejected", 0.0, reason)
    return Answer("error", 0.0, f"http_{answer.status_code}")


def _json(answer: httpx.Response) -> object:
    try:
        return answer.json()
    except ValueError:
        return None


async def run_load(
    target: Target,
    payers: Payers,
    price: Price,
    shape: Shape,
    clients: list[httpx.AsyncClient],
    on_answer: Callable[[Answer], None] = lambda _: None,
    clock: Clock | None = None,
) -> tuple[list[Answer], list[Paid], float]:
    """Send the payments; every answer with its latency, the successful payments, the wall
    time from the first send to the last answer. Open-loop latency counts from when a payment
    was due, so a facilitator that falls behind is not flattered (no coordinated omission)."""
    answers: list[Answer] = []
    succeeded: list[Paid] = []
    for_resource = target.kind == "resource"
    wall = clock or SystemClock()  # signing times; trio's clock paces the load
    start = trio.current_time()
    last = start

    async def one(index: int, due: float, client: httpx.AsyncClient) -> None:
        nonlocal last
        paid = sign(
            price,
            payers.keys[index % len(payers.keys)],
            int(wall.now()),
            for_resource=for_resource,
        )
        try:
            if for_resource:
                answer = await pay_resource(client, target, paid, price.version)
            else:
                answer = await pay_facilitator(client, target, paid)
        except httpx.TimeoutException:
            answer = Answer("error", 0.0, "timeout")
        except httpx.TransportError as exc:
            answer = Answer("error", 0.0, type(exc).__name__)
        now = trio.current_time()
        last = max(last, now)
        answer = msgspec.structs.replace(answer, latency_s=now - due)
        answers.append(answer)
        if answer.verdict in ("settled", "accepted"):
            succeeded.append(msgspec.structs.replace(paid, settled=answer.verdict == "settled"))
        on_answer(answer)

    async with trio.open_nursery() as nursery:
        if shape.rate is not None:
            limiter = trio.CapacityLimiter(shape.concurrency)
            for index in itertools.count():
                due = start + shape.start_offset_s(index)
                if not shape.more(index, due - start):
                    break
                await trio.sleep_until(due)
                await limiter.acquire_on_behalf_of(index)

                async def limited(index: int = index, due: float = due) -> None:
                    try:
                        await one(index, due, clients[index % len(clients)])
                    finally:
                        limiter.release_on_behalf_of(index)

                nursery.start_soon(limited)
        else:
            counter = itertools.count()

            async def worker(client: httpx.AsyncClient) -> None:
                while shape.more(index := next(counter), trio.current_time() - start):
                    await one(index, trio.current_time(), client)

            for n in range(shape.concurrency):
                nursery.start_soon(worker, clients[n % len(clients)])
    return answers, succeeded, last - start


# ---------------------------------------------------------------------- the chain's view


async def chain_view(
    rpc: Rpc, tokens: set[bytes], paid: list[Paid], from_block: int, wait_s: float
) -> ChainView:
    """Find the successful payments' ``AuthorizationUsed`` logs from ``from_block`` on, waiting
    up to ``wait_s`` for all of them (a deferred facilitator settles later), then add up the gas
    of the transactions that carried them."""
    wanted = {(p.payer, p.nonce) for p in paid}
    tx_of: dict[tuple[bytes, bytes], str] = {}
    started = trio.current_time()
    next_block = from_block
    while True:
        head = int(await rpc.call("eth_blockNumber"), 16)
        if head >= next_block:
            logs = await rpc.call(
                "eth_getLogs",
                [
                    {
                        "fromBlock": hex(next_block),
                        "toBlock": hex(head),
                        "address": ["0x" + t.hex() for t in sorted(tokens)],
                        "topics": [AUTHORIZATION_USED],
                    }
                ],
            )
            for log in logs:
                key = (bytes.fromhex(log["topics"][1][-40:]), bytes.fromhex(log["topics"][2][2:]))
                if key in wanted:
                    tx_of[key] = log["transactionHash"]
            next_block = head + 1
        if len(tx_of) >= len(wanted) or trio.current_time() - started >= wait_s:
            break
        await trio.sleep(0.5)
    hashes = sorted(set(tx_of.values()))
    gas = 0
    for chunk in range(0, len(hashes), 200):
        for receipt in await rpc.receipts(hashes[chunk : chunk + 200]):
            if receipt is not None:
                gas += int(receipt.gas_used, 16)
    missing = sum(1 for p in paid if p.settled and (p.payer, p.nonce) not in tx_of)
    return ChainView(len(tx_of), len(hashes), gas, trio.current_time() - started, missing)


async def pay(
    target: Target,
    payers: Payers,
    shape: Shape,
    *,
    price: Price | None,
    version: Literal[1, 2] = 2,
    network: str | None = None,
    patience_s: float = 30.0,
    wait_chain_s: float = 60.0,
    say: Callable[[str], None] = lambda _: None,
    on_start: Callable[[Price, int], None] = lambda *_: None,
    on_answer: Callable[[Answer], None] = lambda _: None,
) -> PayRun:
    """Discover (``/supported`` or the 402), send, then ask the chain. ``price`` is needed for
    a facilitator (what to pay), and read from the 402 for a resource server."""
    rpc = Rpc(payers.rpc_url, timeout_s=30)
    # httpcore's pool scans every connection for each request (quadratic in the pool size:
    # a 1,000-connection pool spent more CPU than the server), so a load gets many small pools.
    # Idle connections are dropped before the server's keep-alive timeout (5 s in hypercorn),
    # or a request may go out on a connection the server is closing.
    per_client = CONNECTIONS_PER_CLIENT
    limits = httpx.Limits(
        max_connections=per_client, max_keepalive_connections=per_client, keepalive_expiry=2.0
    )
    timeout = httpx.Timeout(300.0, connect=10.0)
    shards = -(-shape.concurrency // per_client)
    try:
        try:
            chain_id = await rpc.chain_id()
        except Exception as exc:
            raise ConfigError(f"the chain at {payers.rpc_url} does not answer: {exc}") from None
        async with contextlib.AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(
                    httpx.AsyncClient(headers=target.headers, limits=limits, timeout=timeout)
                )
                for _ in range(shards)
            ]
            client = clients[0]
            if target.kind == "resource":
                price = await read_402(client, target.url, chain_id, patience_s, say)
            else:
                assert price is not None
                if price.domain.chain_id != chain_id:
                    raise ConfigError(
                        f"the payers' chain {payers.rpc_url} is {chain_id}, the token's"
                        f" {price.domain.chain_id}"
                    )
                supported = await await_facilitator(client, target.url, patience_s, say)
                chosen = choose_network(supported, chain_id, version, network)
                price = msgspec.structs.replace(price, version=version, network=chosen)
            from_block = int(await rpc.call("eth_blockNumber"), 16)
            on_start(price, chain_id)
            answers, succeeded, wall_s = await run_load(
                target, payers, price, shape, clients, on_answer
            )
        view = None
        if succeeded:
            view = await chain_view(
                rpc, {price.domain.address}, succeeded, from_block, wait_chain_s
            )
        first_payer = "0x" + crypto.private_key_address(payers.keys[0]).hex()
        return PayRun(summarize(answers, wall_s, view), answers, first_payer)
    finally:
        await rpc.aclose()
