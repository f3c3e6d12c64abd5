"""JSON-RPC over httpx, under trio (web3's async providers are asyncio-only).

Transport faults (connection refused, timeouts, HTTP 429/5xx) are retried with bounded
exponential backoff; a JSON-RPC error object is returned to the caller as :class:`RpcError`,
because only the caller knows whether "nonce too low" or a revert is expected.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import httpx
import msgspec
import trio

from . import codec
from .codec import Receipt


class RpcError(Exception):
    """The node answered with a JSON-RPC error object."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.data = data

    @property
    def revert_data(self) -> bytes | None:
        data = self.data
        if isinstance(data, dict):
            data = data.get("data")
        if isinstance(data, str) and data.startswith("0x"):
            try:
                return bytes.fromhex(data[2:])
            except ValueError:
                return None
        return None


class RpcUnavailable(Exception):
    """The node could not be reached after every retry."""


class ChainClient(Protocol):
    """Everything the engine asks of a chain: the narrow interface the stages are written
    against. :class:`Rpc` speaks it as JSON-RPC to a node; ``engine.sim.FakeChain`` answers it
    in process for seeded fault campaigns. Failures are :class:`RpcError` (the node answered
    with an error) or :class:`RpcUnavailable` (no usable answer)."""

    requests: int

    async def aclose(self) -> None: ...
    async def chain_id(self) -> int: ...
    async def block_number(self) -> int: ...
    async def block_hash(self, number: int) -> str | None: ...
    async def code(self, address: bytes) -> bytes: ...
    async def base_fee(self) -> int: ...
    async def nonce(self, address: str, block: str = "pending") -> int: ...
    async def eth_call(
        self, to: bytes, data: bytes, sender: str | None = None, gas: int | None = None
    ) -> bytes: ...
    async def estimate_gas(self, to: bytes, data: bytes, sender: str) -> int: ...
    async def eth_call_code(self, code: bytes) -> bytes: ...
    async def send_raw(self, raw: bytes) -> str: ...
    async def receipts(self, tx_hashes: Sequence[str]) -> list[Receipt | None]: ...
    async def authorization_states(
        self, token: bytes, keys: Sequence[tuple[bytes, bytes]]
    ) -> list[bool]: ...
    async def authorization_used_in(
        self, token: bytes, payer: bytes, nonce: bytes, from_block: int
    ) -> str | None: ...


class _Error(msgspec.Struct):
    code: int
    message: str
    data: Any = None


class _Response(msgspec.Struct):
    id: int | None = None
    result: Any = None
    error: _Error | None = None


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(_Response | list[_Response])
_receipt_decoder = msgspec.json.Decoder(Receipt | None)


class Rpc:
    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 10.0,
        retries_max: int = 6,
        backoff_s: float = 0.1,
        backoff_max_s: float = 2.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url
        self._client = httpx.AsyncClient(
            timeout=timeout_s,
            transport=transport,
            limits=httpx.Limits(max_connections=8),
        )
        self._retries_max = retries_max
        self._backoff_s = backoff_s
        self._backoff_max_s = backoff_max_s
        self._next_id = 1
        self.requests = 0  # statistics

    async def aclose(self) -> None:
        await self._client.aclose()

    async def call(self, method: str, params: Sequence[Any] = ()) -> Any:
        request_id = self._next_id
        self._next_id += 1
        body = _encoder.encode(
            {"jsonrpc": "2.0", "id": request_id, "method": method, "params": list(params)}
        )
        response = await self._post(body)
        if isinstance(response, list):
            raise RpcUnavailable(f"{method}: batch answer to a single call")
        if response.error is not None:
            raise RpcError(response.error.code, response.error.message, response.error.data)
        return response.result

    async def batch(self, calls: Sequence[tuple[str, Sequence[Any]]]) -> list[Any]:
        """Several calls in one HTTP request; each result or an :class:`RpcError` in order."""
        if not calls:
            return []
        first = self._next_id
        self._next_id += len(calls)
        body = _encoder.encode(
            [
                {"jsonrpc": "2.0", "id": first + i, "method": m, "params": list(p)}
                for i, (m, p) in enumerate(calls)
            ]
        )
        response = await self._post(body)
        items = response if isinstance(response, list) else [response]
        by_id = {r.id: r for r in items}
        out: list[Any] = []
        for i in range(len(calls)):
            r = by_id.get(first + i)
            if r is None:
                out.append(RpcError(-32603, "missing response in batch"))
            elif r.error is not None:
                out.append(RpcError(r.error.code, r.error.message, r.error.data))
            else:
                out.append(r.result)
        return out

    async def _post(self, body: bytes) -> _Response | list[_Response]:
        delay = self._backoff_s
        last: Exception | None = None
        for _attempt in range(self._retries_max + 1):
            try:
                self.requests += 1
                resp = await self._client.post(
                    self.url, content=body, headers={"content-type": "application/json"}
                )
                if resp.status_code == 429 or resp.status_code >= 500:
                    last = RpcUnavailable(f"HTTP {resp.status_code}")
                else:
                    resp.raise_for_status()
                    decoded: _Response | list[_Response] = _decoder.decode(resp.content)
                    return decoded
            except (httpx.TransportError, msgspec.DecodeError) as exc:
                last = exc
            except httpx.HTTPStatusError as exc:
                raise RpcUnavailable(f"{self.url}: {exc}") from exc
            await trio.sleep(delay)
            delay = min(delay * 2, self._backoff_max_s)
        raise RpcUnavailable(f"{self.url}: gave up after {self._retries_max + 1} tries: {last}")

    # -- typed helpers ----------------------------------------------------------------------

    async def chain_id(self) -> int:
        return int(await self.call("eth_chainId"), 16)

    async def block_number(self) -> int:
        return int(await self.call("eth_blockNumber"), 16)

    async def base_fee(self) -> int:
        block = await self.call("eth_getBlockByNumber", ["latest", False])
        return int(block.get("baseFeePerGas", "0x0"), 16)

    async def nonce(self, address: str, block: str = "pending") -> int:
        return int(await self.call("eth_getTransactionCount", [address, block]), 16)

    async def eth_call(
        self, to: bytes, data: bytes, sender: str | None = None, gas: int | None = None
    ) -> bytes:
        tx: dict[str, str] = {"to": "0x" + to.hex(), "data": "0x" + data.hex()}
        if sender:
            tx["from"] = sender
        if gas is not None:
            tx["gas"] = hex(gas)
        result = await self.call("eth_call", [tx, "latest"])
        return bytes.fromhex(result[2:])

    async def eth_call_code(self, code: bytes) -> bytes:
        """``eth_call`` with no ``to``: runs ``code`` as creation code and returns what its
        constructor returns (a deployless call: nothing needs to exist on the chain)."""
        result = await self.call("eth_call", [{"data": "0x" + code.hex()}, "latest"])
        return bytes.fromhex(result[2:])

    async def estimate_gas(self, to: bytes, data: bytes, sender: str) -> int:
        tx = {"from": sender, "to": "0x" + to.hex(), "data": "0x" + data.hex()}
        return int(await self.call("eth_estimateGas", [tx]), 16)

    async def send_raw(self, raw: bytes) -> str:
        return str(await self.call("eth_sendRawTransaction", ["0x" + raw.hex()]))

    async def receipts(self, tx_hashes: Sequence[str]) -> list[Receipt | None]:
        results = await self.batch([("eth_getTransactionReceipt", [h]) for h in tx_hashes])
        out: list[Receipt | None] = []
        for r in results:
            if isinstance(r, RpcError):
                out.append(None)
            else:
                out.append(msgspec.convert(r, Receipt | None))
        return out

    async def block_hash(self, number: int) -> str | None:
        block = await self.call("eth_getBlockByNumber", [hex(number), False])
        return None if block is None else str(block["hash"])

    async def code(self, address: bytes) -> bytes:
        """The code deployed at ``address`` now (``eth_getCode``; empty: none)."""
        result = await self.call("eth_getCode", ["0x" + address.hex(), "latest"])
        return bytes.fromhex(str(result)[2:])

    async def authorization_states(
        self, token: bytes, keys: Sequence[tuple[bytes, bytes]]
    ) -> list[bool]:
        """``authorizationState(payer, nonce)`` of each key (used or cancelled: True)."""
        results = await self.batch(
            [
                (
                    "eth_call",
                    [
                        {
                            "to": "0x" + token.hex(),
                            "data": "0x" + codec.authorization_state_calldata(p, n).hex(),
                        },
                        "latest",
                    ],
                )
                for p, n in keys
            ]
        )
        out: list[bool] = []
        for result in results:
            if isinstance(result, RpcError):
                raise result
            out.append(int(result, 16) != 0)
        return out

    async def authorization_used_in(
        self, token: bytes, payer: bytes, nonce: bytes, from_block: int
    ) -> str | None:
        """The hash of the transaction whose ``AuthorizationUsed(payer, nonce)`` log the token
        emitted (None: no such log since ``from_block``)."""
        logs = await self.call(
            "eth_getLogs",
            [
                {
                    "address": "0x" + token.hex(),
                    "fromBlock": hex(max(0, from_block)),
                    "toBlock": "latest",
                    "topics": [
                        "0x" + codec.AUTHORIZATION_USED.hex(),
                        "0x" + bytes(12).hex() + payer.hex(),
                        "0x" + nonce.hex(),
                    ],
                }
            ],
        )
        for entry in msgspec.convert(logs, list[dict[str, Any]]):
            return str(entry["transactionHash"])
        return None
