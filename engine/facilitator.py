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
import trio

from . import reasons
from .config import ServiceConfig, SettlementMode
from .engine import Engine
from .metrics import Exposition, Histogram
from .model import Accepted, Outcome

_encoder = msgspec.json.Encoder()


class FacilitatorRequest(msgspec.Struct, rename="camel"):
    x402_version: int
    payment_payload: msgspec.Raw
    payment_requirements: msgspec.Raw


class _NetworkProbe(msgspec.Struct):
    network: str = ""


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
        self._payee_modes = {k.lower(): v for k, v in config.payee_settlement.items()}
        self.http_latency = {"verify": Histogram(), "settle": Histogram()}
        self.requests: dict[tuple[str, int], int] = {}

    def mode_for(self, payee: str) -> SettlementMode:
        return self._payee_modes.get(payee.lower(), self.config.settlement)

    def count(self, route: str, status: int, started: float) -> None:
        self.requests[(route, status)] = self.requests.get((route, status), 0) + 1
        if route in self.http_latency:
            self.http_latency[route].observe(time.perf_counter() - started)

    async def verify(self, body: bytes) -> Response:
        parsed = _parse(body)
        if not isinstance(parsed, FacilitatorRequest):
            return parsed
        if parsed.x402_version not in (1, 2):
            return 200, _encoder.encode(
                VerifyResponse(False, reasons.INVALID_VERSION, "x402Version must be 1 or 2")
            )
        payment, rejected = self.engine.check(parsed.payment_payload, parsed.payment_requirements)
        if rejected is not None:
            return 200, _encoder.encode(
                VerifyResponse(False, rejected.reason, rejected.message, rejected.payer)
            )
        assert payment is not None
        return 200, _encoder.encode(VerifyResponse(True, payer="0x" + payment.payer.hex()))

    async def settle(self, body: bytes) -> Response:
        parsed = _parse(body)
        if not isinstance(parsed, FacilitatorRequest):
            return parsed
        network = _network(parsed.payment_requirements)
        if parsed.x402_version not in (1, 2):
            return 200, _encoder.encode(
                SettleResponse(
                    False, "", network, reasons.INVALID_VERSION, "x402Version must be 1 or 2"
                )
            )
        result = await self.engine.submit(parsed.payment_payload, parsed.payment_requirements)
        if not isinstance(result, Accepted):
            return 200, _encoder.encode(
                SettleResponse(
                    False, "", network, result.reason, result.message, payer=result.payer
                )
            )
        current = await self.engine.status(result.id)
        assert current is not None
        if self.mode_for(current.payee) == "deferred":
            return 200, _encoder.encode(
                SettleResponse(
                    True,
                    "",
                    network,
                    payer=result.payer,
                    amount=str(current.value),
                    extra={"settlementId": result.id, "state": current.state},
                )
            )
        outcome: Outcome | None = None
        with trio.move_on_after(self.config.settle_timeout_s):
            outcome = await self.engine.wait(result.id)
        if outcome is None:
            pending = await self.engine.status(result.id)
            return 200, _encoder.encode(
                SettleResponse(
                    False,
                    (pending.tx_hash if pending else None) or "",
                    network,
                    reasons.SETTLEMENT_PENDING,
                    f"not confirmed within {self.config.settle_timeout_s:g} s; settlement"
                    f" {result.id} continues",
                    payer=result.payer,
                    extra={"settlementId": result.id},
                )
            )
        if outcome.state == "settled":
            return 200, _encoder.encode(
                SettleResponse(
                    True,
                    outcome.tx_hash or "",
                    network,
                    payer=result.payer,
                    amount=str(outcome.value),
                    extra={"settlementId": result.id},
                )
            )
        return 200, _encoder.encode(
            SettleResponse(
                False,
                outcome.tx_hash or "",
                network,
                outcome.reason or reasons.UNEXPECTED_SETTLE,
                outcome.message,
                payer=result.payer,
                extra={"settlementId": result.id},
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
        history = await self.engine.history(rid)
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
        return 200, _encoder.encode({"status": "ok", "pending": self.engine.statistics().pending})

    def metrics(self) -> Response:
        stats = self.engine.statistics()
        page = Exposition()
        page.metric(
            "x402_payments_accepted_total",
            "counter",
            "Payments durably accepted.",
            [({}, stats.accepted)],
        )
        page.metric(
            "x402_payments_duplicate_total",
            "counter",
            "Identical payloads submitted again.",
            [({}, stats.duplicates)],
        )
        page.metric(
            "x402_payments_rejected_total",
            "counter",
            "Payments refused at ingest, by reason.",
            [({"reason": r}, n) for r, n in sorted(stats.rejected.items())],
        )
        page.metric(
            "x402_payments_settled_total",
            "counter",
            "Payments settled on chain.",
            [({}, stats.settled)],
        )
        page.metric(
            "x402_payments_failed_total",
            "counter",
            "Payments that failed, by reason.",
            [({"reason": r}, n) for r, n in sorted(stats.failed.items())],
        )
        page.metric(
            "x402_payments_pending",
            "gauge",
            "Accepted payments not yet final.",
            [({}, stats.pending)],
        )
        page.metric(
            "x402_queue_depth",
            "gauge",
            "Payments waiting for a batch, per chain.",
            [({"chain_id": str(c)}, n) for c, n in sorted(self.engine.queue_depths().items())],
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
        page.metric(
            "x402_credit_refused_total",
            "counter",
            "Deferred payments refused because the payer's balance or cap would be exceeded.",
            [({"chain_id": str(c)}, s["refused"]) for c, s in sorted(credit.items())],
        )
        page.metric(
            "x402_credit_shortfalls_total",
            "counter",
            "Payers found holding less than they owe (settled early).",
            [({"chain_id": str(c)}, s["shortfalls"]) for c, s in sorted(credit.items())],
        )
        page.metric(
            "x402_batches_inflight",
            "gauge",
            "Batches sent and not yet final, per chain.",
            [({"chain_id": str(c)}, n) for c, n in sorted(self.engine.inflight_batches().items())],
        )
        page.metric(
            "x402_batches_sent_total",
            "counter",
            "Batch transactions broadcast.",
            [({}, stats.batches_sent)],
        )
        page.metric(
            "x402_batches_mined_total",
            "counter",
            "Batch transactions mined and final.",
            [({}, stats.batches_mined)],
        )
        page.metric(
            "x402_gas_used_total",
            "counter",
            "Gas used by mined batches.",
            [({}, stats.gas_used)],
        )
        page.metric(
            "x402_fee_wei_total",
            "counter",
            "Fees paid by mined batches, in wei.",
            [({}, stats.fee_wei)],
        )
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
        page.histogram(
            "x402_settlement_seconds",
            "From acceptance to final state.",
            self.engine.settle_latency(),
            {},
        )
        return 200, page.render()
