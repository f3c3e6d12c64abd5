"""The x402 facilitator API as protocol logic: request bytes in, (status, response bytes) out.

No HTTP here (``service.py`` adapts it to ASGI). Negative verify/settle results are HTTP 200
with x402 reason codes, as the SDKs expect (the official Python client raises on any non-200);
only a body that is not a facilitator request at all is a 400.

Settlement modes for ``/settle``:

- ``confirmed``: answer when the batch holding the payment is mined with the configured
  confirmations: ``success`` and the batch's transaction hash. If that takes longer than
  ``settle_timeout_s``, answer ``success: false, errorReason: "settlement_pending"`` with the
  batch's transaction hash (the SDK then retries ``/settle`` once, which is idempotent here).
- ``deferred``: answer ``success: true`` as soon as the payment is durable, with an empty
  ``transaction`` and ``extra.settlementId``; the outcome is read later from
  ``GET /settlements/{id}``.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from ..config import ServiceConfig
from ..engine import Engine
from ..model import EngineError, hex_addr
from ..rules import reasons
from ..stages.verify import probe_payer
from .metrics import Families, Histogram, Metric, registry, render

_encoder = msgspec.json.Encoder()
# The ledger's event columns in the x402 wire's key style (camelCase, ``transaction``)
_HISTORY_KEYS = {
    "at_ms": "atMs",
    "batch_id": "batchId",
    "tx_hash": "transaction",
    "block_number": "blockNumber",
    "gas_used": "gasUsed",
    "fee_wei": "feeWei",
}


class FacilitatorRequest(msgspec.Struct, rename="camel"):
    payment_payload: msgspec.Raw
    payment_requirements: msgspec.Raw
    # Optional, as in the reference example facilitators: the version is paymentPayload's.
    x402_version: int | None = None


class _NetworkProbe(msgspec.Struct):
    network: str = ""


class _VersionProbe(msgspec.Struct, rename="camel"):
    x402_version: Any = None


class VerifyResponse(msgspec.Struct, rename="camel", omit_defaults=True):
    is_valid: bool
    invalid_reason: str | None = None
    invalid_message: str | None = None
    payer: str | None = None


class SettleResponse(msgspec.Struct, rename="camel", omit_defaults=True):
    success: bool
    transaction: str
    network: str
    error_reason: str | None = None
    error_message: str | None = None
    payer: str | None = None
    amount: str | None = None
    extra: dict[str, Any] | None = None


class ErrorBody(msgspec.Struct):
    error: str
    detail: str = ""


_request_decoder = msgspec.json.Decoder(FacilitatorRequest)
_probe_decoder = msgspec.json.Decoder(_NetworkProbe)
_version_decoder = msgspec.json.Decoder(_VersionProbe)

Response = tuple[int, bytes]


def error(status: int, message: str, detail: str = "") -> Response:
    return status, _encoder.encode(ErrorBody(message, detail))


def _parse(body: bytes) -> FacilitatorRequest | Response:
    """The request envelope, or a 400. A well-formed envelope with an unknown x402Version or
    a malformed payload inside is not a 400: it gets a negative result with a reason code."""
    try:
        return _request_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return error(400, "invalid request body", str(exc))


def _version_problem(request: FacilitatorRequest) -> str | None:
    """Why the envelope's version is unusable (None: fine). The top-level ``x402Version`` may
    be left out; when given it must be 1 or 2 and agree with the payload's."""
    try:
        inner = _version_decoder.decode(request.payment_payload).x402_version
    except (msgspec.DecodeError, msgspec.ValidationError):
        inner = None  # the payload's own decoding reports it
    outer = request.x402_version
    if outer is None:
        return None
    if outer not in (1, 2):
        return "x402Version must be 1 or 2"
    if inner is not None and inner != outer:
        return f"x402Version {outer} differs from paymentPayload.x402Version {inner!r}"
    return None


class AdminQuery(msgspec.Struct, forbid_unknown_fields=True):
    sql: str
    params: list[Any] = msgspec.field(default_factory=list)


class AdminSweep(msgspec.Struct, forbid_unknown_fields=True):
    payee: str | None = None


def _plain(value: Any) -> Any:
    """A database value as JSON: exact decimals and integers beyond 2^53 as strings."""
    if isinstance(value, bool) or value is None or isinstance(value, float | str):
        return value
    if isinstance(value, int):
        return value if abs(value) < 2**53 else str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return "0x" + bytes(value).hex()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return str(value)  # Decimal, dates


def _network(raw: msgspec.Raw) -> str:
    try:
        return _probe_decoder.decode(raw).network
    except (msgspec.DecodeError, msgspec.ValidationError):
        return ""


class Facilitator:
    """/verify, /settle, /supported, /settlements/{id}, /healthz, /metrics over one engine."""

    def __init__(self, engine: Engine, config: ServiceConfig) -> None:
        self.engine = engine
        self.config = config
        self.http_latency = {"verify": Histogram(), "settle": Histogram()}
        self._registry = registry(self._families)
        self.requests: dict[tuple[str, int], int] = {}

    def count(self, route: str, status: int, started: float) -> None:
        self.requests[(route, status)] = self.requests.get((route, status), 0) + 1
        if route in self.http_latency:
            self.http_latency[route].observe(time.perf_counter() - started)

    async def verify(self, body: bytes) -> Response:
        parsed = _parse(body)
        if not isinstance(parsed, FacilitatorRequest):
            return parsed
        problem = _version_problem(parsed)
        if problem is not None:
            payer = probe_payer(parsed.payment_payload)
            return 200, _encoder.encode(
                VerifyResponse(False, reasons.INVALID_VERSION, problem, payer)
            )
        payment, rejected = await self.engine.verify(
            parsed.payment_payload, parsed.payment_requirements
        )
        if rejected is not None:
            return 200, _encoder.encode(
                VerifyResponse(False, rejected.reason, rejected.message, rejected.payer)
            )
        assert payment is not None
        return 200, _encoder.encode(VerifyResponse(True, payer=hex_addr(payment.payer)))

    async def settle(self, body: bytes) -> Response:
        parsed = _parse(body)
        if not isinstance(parsed, FacilitatorRequest):
            return parsed
        network = _network(parsed.payment_requirements)
        problem = _version_problem(parsed)
        if problem is not None:
            payer = probe_payer(parsed.payment_payload)
            return 200, _encoder.encode(
                SettleResponse(False, "", network, reasons.INVALID_VERSION, problem, payer)
            )
        try:
            answer = await self.engine.settle(parsed.payment_payload, parsed.payment_requirements)
        except EngineError as exc:  # the ledger could not record it: not accepted, say so
            return 503, _encoder.encode(
                SettleResponse(
                    False,
                    "",
                    network,
                    reasons.UNEXPECTED_SETTLE,
                    f"{exc}; the payment was not accepted, retry",
                    probe_payer(parsed.payment_payload),
                )
            )
        extra: dict[str, Any] | None = None
        if answer.settlement_id is not None:
            extra = {"settlementId": answer.settlement_id}
            if answer.success and not answer.transaction and answer.state is not None:
                extra["state"] = answer.state  # deferred: where the settlement stands
        return 200, _encoder.encode(
            SettleResponse(
                answer.success,
                answer.transaction,
                network,
                answer.reason,
                answer.message,
                payer=answer.payer,
                amount=str(answer.amount) if answer.success and answer.amount else None,
                extra=extra,
            )
        )

    def supported(self) -> Response:
        return 200, _encoder.encode(self.engine.supported())

    async def settlement(self, raw_id: str) -> Response:
        if not raw_id.isascii() or not raw_id.isdigit() or len(raw_id) > 18:
            return error(404, "no such settlement")
        rid = int(raw_id)
        outcome = await self.engine.status(rid)
        if outcome is None:
            return error(404, "no such settlement")
        history = [
            {_HISTORY_KEYS.get(key, key): value for key, value in event.items()}
            for event in await self.engine.history(rid)
        ]
        return 200, _encoder.encode(
            {
                "id": outcome.id,
                "state": outcome.state,
                "final": outcome.final,
                "chainId": outcome.chain_id,
                "payer": outcome.payer,
                "payee": outcome.payee,
                "amount": str(outcome.value),
                "transaction": outcome.tx_hash,
                "blockNumber": outcome.block_number,
                "gasUsed": outcome.gas_used,
                "reason": outcome.reason,
                "message": outcome.message,
                "history": history,
            }
        )

    def healthz(self) -> Response:
        health = self.engine.health()
        if health.ok:
            return 200, _encoder.encode({"status": "ok", "pending": health.pending})
        return 503, _encoder.encode(
            {
                "status": "stalled",
                "reason": health.reason,
                "pending": health.pending,
                "sinceProgressS": round(health.since_progress_s, 1),
            }
        )

    def metrics(self) -> Response:
        return 200, render(self._registry)

    # -- operations while serving (the CLI's report and sweep talk to these) ----------------

    async def admin_query(self, body: bytes) -> Response:
        """Read-only SQL over the ledger: ``{"sql": ..., "params": [...]}`` ->
        ``{"dialect", "columns", "rows"}`` (decimals and big integers as strings, bytes as
        ``0x`` hex)."""
        try:
            request = msgspec.json.decode(body, type=AdminQuery)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return error(400, f"bad query request: {exc}")
        if ";" in request.sql.strip().rstrip(";"):
            return error(400, "one statement per query")
        try:
            columns, rows = await self.engine.query_with_columns(request.sql, request.params)
        except Exception as exc:  # the operator's SQL: say what the database said
            return error(400, f"query failed: {exc}")
        return 200, _encoder.encode(
            {
                "dialect": self.engine.ledger_dialect(),
                "columns": columns,
                "rows": [[_plain(v) for v in row] for row in rows],
            }
        )

    def admin_sweep(self, body: bytes) -> Response:
        """Settle every waiting payment (of ``payee``) now: ``{"payee": "0x..." | null}``."""
        try:
            request = msgspec.json.decode(body or b"{}", type=AdminSweep)
            waiting = self.engine.settle_now(request.payee)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            return error(400, f"bad sweep request: {exc}")
        return 200, _encoder.encode({"waiting": waiting})

    def admin_progress(self) -> Response:
        """What a sweep waits for: unbatched payments per payee pool, batches in flight."""
        stats = self.engine.statistics()
        queued = {
            f"{chain}:{payee or '*'}": n
            for (chain, payee), n in self.engine.payee_queue_depths().items()
        }
        return 200, _encoder.encode(
            {
                "pending": stats.pending,
                "queued": queued,
                "inflightBatches": sum(self.engine.inflight_batches().values()),
                "settled": stats.settled,
                "failed": dict(stats.failed),
                "batchesMined": stats.batches_mined,
                "gasUsed": stats.gas_used,
                "itemsInMinedBatches": stats.items_in_mined_batches,
            }
        )

    def _families(self) -> list[Metric]:
        """Every engine metric of one scrape."""
        page = Families()
        self._payment_metrics(page)
        self._queue_metrics(page)
        self._credit_metrics(page)
        self._chain_metrics(page)
        self._http_metrics(page)
        return page.families

    def _payment_metrics(self, page: Families) -> None:
        stats = self.engine.statistics()
        for name, kind, text, value in (
            (
                "x402_payments_accepted_total",
                "counter",
                "Payments durably accepted.",
                stats.accepted,
            ),
            (
                "x402_payments_duplicate_total",
                "counter",
                "Identical payloads submitted again.",
                stats.duplicates,
            ),
            ("x402_payments_settled_total", "counter", "Payments settled on chain.", stats.settled),
            ("x402_payments_pending", "gauge", "Accepted payments not yet final.", stats.pending),
            (
                "x402_payments_sold_total",
                "counter",
                "Payments a /settle answered success for (once each).",
                self.engine.sale_statistics().sold,
            ),
            (
                "x402_batches_sent_total",
                "counter",
                "Batch transactions broadcast.",
                stats.batches_sent,
            ),
            (
                "x402_batches_mined_total",
                "counter",
                "Batch transactions mined and final.",
                stats.batches_mined,
            ),
            ("x402_gas_used_total", "counter", "Gas used by mined batches.", stats.gas_used),
            ("x402_fee_wei_total", "counter", "Fees paid by mined batches, in wei.", stats.fee_wei),
        ):
            page.metric(name, kind, text, [({}, value)])
        for name, text, by_reason in (
            (
                "x402_payments_rejected_total",
                "Payments refused at ingest, by reason.",
                stats.rejected,
            ),
            ("x402_payments_failed_total", "Payments that failed, by reason.", stats.failed),
        ):
            page.metric(
                name, "counter", text, [({"reason": r}, n) for r, n in sorted(by_reason.items())]
            )
        page.histogram(
            "x402_settlement_seconds",
            "From acceptance to final state.",
            self.engine.settle_latency(),
            {},
        )

    def _queue_metrics(self, page: Families) -> None:
        per_chain = (
            (
                "x402_queue_depth",
                "Payments waiting for a batch, per chain.",
                self.engine.queue_depths(),
            ),
            (
                "x402_batches_inflight",
                "Batches sent and not yet final, per chain.",
                self.engine.inflight_batches(),
            ),
        )
        for name, text, values in per_chain:
            page.metric(
                name, "gauge", text, [({"chain_id": str(c)}, n) for c, n in sorted(values.items())]
            )
        page.metric(
            "x402_payee_queue_depth",
            "gauge",
            "Payments waiting for a batch, per payee with a schedule of its own (sweep progress).",
            [
                ({"chain_id": str(c), "payee": p}, n)
                for (c, p), n in sorted(self.engine.payee_queue_depths().items())
            ],
        )

    def _credit_metrics(self, page: Families) -> None:
        credit = self.engine.credit_statistics()
        page.metric(
            "x402_credit_owed",
            "gauge",
            "Accepted but unsettled value of deferred payments, per token (base units).",
            [
                ({"chain_id": str(c), "token": t}, v)
                for c, s in sorted(credit.items())
                for t, v in sorted(s["owed"].items())
            ],
        )
        for name, text, key in (
            (
                "x402_credit_refused_total",
                "Deferred payments refused because the payer's balance or cap would be exceeded.",
                "refused",
            ),
            (
                "x402_credit_shortfalls_total",
                "Payers found holding less than they owe (settled early).",
                "shortfalls",
            ),
        ):
            page.metric(
                name,
                "counter",
                text,
                [({"chain_id": str(c)}, s[key]) for c, s in sorted(credit.items())],
            )

    def _chain_metrics(self, page: Families) -> None:
        states = sorted(self.engine.state_statistics().items())
        for name, text, field in (
            (
                "x402_state_reads_total",
                "eth_calls that read balances and authorization states for /verify, per chain.",
                "reads",
            ),
            (
                "x402_state_payments_read_total",
                "/verify questions answered by those reads, per chain.",
                "payments_read",
            ),
            (
                "x402_state_cache_hits_total",
                "/verify questions answered from recent reads, per chain.",
                "cache_hits",
            ),
        ):
            page.metric(
                name,
                "counter",
                text,
                [({"chain_id": str(c)}, getattr(s, field)) for c, s in states],
            )
        page.metric(
            "x402_rpc_requests_total",
            "counter",
            "JSON-RPC HTTP requests sent, per chain.",
            [({"chain_id": str(c)}, n) for c, n in sorted(self.engine.rpc_requests().items())],
        )

    def _http_metrics(self, page: Families) -> None:
        page.metric(
            "x402_http_requests_total",
            "counter",
            "HTTP requests by route and status.",
            [({"route": r, "status": str(s)}, n) for (r, s), n in sorted(self.requests.items())],
        )
        for route, hist in self.http_latency.items():
            page.histogram(
                "x402_http_request_seconds", "Request latency by route.", hist, {"route": route}
            )
