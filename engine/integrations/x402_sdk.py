"""Batched settlement inside the official x402 Python SDK's facilitator (PyPI ``x402``, the
``sdk`` extra): scheme mechanisms for ``exact`` on ``eip155:*``, x402 v2 and v1, backed by a
running engine. An operator who built a facilitator from the SDK keeps it, and replaces the
SDK's own exact EVM mechanism with one call::

    handle = EngineHandle(load_config("engine.toml"), environ=os.environ)
    register_batched_exact_evm(facilitator, handle)   # instead of register_exact_evm_facilitator

``verify`` and ``settle`` are the engine's (the same checks, batching, one payment one purchase,
the settlement modes, ``settlement_pending``); their answers become the SDK's
``VerifyResponse`` / ``SettleResponse`` field for field as our facilitator service sends them.

The SDK calls a mechanism synchronously, in its asyncio facilitator too (from the event loop's
thread). With :class:`x402.x402FacilitatorSync` every request has its thread, and the mechanism
blocks that thread on the engine. With the asyncio :class:`x402.x402Facilitator`, a blocking
``settle`` would hold the event loop for the whole settlement, one request after another, and
nothing would batch. So for it the work moves into before-hooks, which the SDK awaits: the hook
starts the engine call (:meth:`EngineHandle.start`: the engine's own trio thread does the work,
no thread per request, no asyncio in the engine), awaits its answer on the host's loop, and
the mechanism returns that answer when the SDK calls it. Each hook does this only while it is
the last hook of its kind (a hook after it could still abort: a payment the settle hook had
sold would go undelivered, a verify answer would go unclaimed); otherwise the mechanism does
the work itself by blocking, which is correct, only slower.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Literal

try:
    from x402 import x402Facilitator, x402FacilitatorSync
    from x402.interfaces import FacilitatorContext
    from x402.schemas import (
        PaymentPayload,
        PaymentPayloadV1,
        PaymentRequirements,
        PaymentRequirementsV1,
        SettleResponse,
        VerifyResponse,
    )
except ImportError as exc:  # the optional dependency
    raise ImportError(
        "engine.integrations.x402_sdk needs the official x402 SDK: pip install"
        " 'x402-engine[sdk]' (x402 2.25.0, the version it is tested with)"
    ) from exc

from ..handle import EngineHandle
from ..model import Payment, Rejected, SettleAnswer, hex_addr

Payload = PaymentPayload | PaymentPayloadV1
Requirements = PaymentRequirements | PaymentRequirementsV1
Step = Literal["verify", "settle"]


def verify_response(payment: Payment | None, rejected: Rejected | None) -> VerifyResponse:
    """The engine's verify verdict as the SDK's response (our service's ``/verify`` body)."""
    if rejected is not None:
        return VerifyResponse(
            is_valid=False,
            invalid_reason=rejected.reason,
            invalid_message=rejected.message,
            payer=rejected.payer,
        )
    assert payment is not None
    return VerifyResponse(is_valid=True, payer=hex_addr(payment.payer))


def settle_response(answer: SettleAnswer, network: str) -> SettleResponse:
    """The engine's settle answer as the SDK's response (our service's ``/settle`` body):
    ``extra.settlementId`` names the payment for ``GET /settlements/{id}`` or
    ``EngineHandle.status``; a deferred success has no transaction yet and says its state."""
    extra: dict[str, Any] | None = None
    if answer.settlement_id is not None:
        extra = {"settlementId": answer.settlement_id}
        if answer.success and not answer.transaction and answer.state is not None:
            extra["state"] = answer.state
    return SettleResponse(
        success=answer.success,
        error_reason=answer.reason,
        error_message=answer.message,
        payer=answer.payer,
        transaction=answer.transaction,
        network=network,
        amount=str(answer.amount) if answer.success and answer.amount else None,
        extra=extra,
    )


def _wire(model: Any) -> dict[str, Any]:
    """An SDK model as the x402 JSON the engine decodes."""
    dumped: dict[str, Any] = model.model_dump(mode="json", by_alias=True, exclude_none=True)
    return dumped


class _Answers:
    """Engine answers computed by the asyncio facilitator's before-hooks, waiting for the
    mechanism call of the same payload object (the SDK passes the hook's object on). The
    object is held with its answer, so its ``id`` cannot be reused by another payload while
    the answer waits."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[tuple[Step, int], list[tuple[object, Any]]] = {}

    def put(self, step: Step, payload: object, answer: Any) -> None:
        with self._lock:
            self._waiting.setdefault((step, id(payload)), []).append((payload, answer))

    def take(self, step: Step, payload: object) -> Any | None:
        with self._lock:
            queue = self._waiting.get((step, id(payload)))
            if not queue:
                return None
            held, answer = queue.pop(0)
            if not queue:
                del self._waiting[(step, id(payload))]
            assert held is payload
            return answer


class _Mechanism:
    """What the v2 and v1 mechanisms share: the engine, the answers hooks prepared."""

    scheme = "exact"
    caip_family = "eip155:*"

    def __init__(self, handle: EngineHandle, version: Literal[1, 2]) -> None:
        self._handle = handle
        self._version = version
        self.answers = _Answers()
        supported = handle.supported()
        kinds = [
            k for k in supported["kinds"] if k["scheme"] == "exact" and k["x402Version"] == version
        ]
        self._extra: dict[str, dict[str, Any] | None] = {
            k["network"]: k.get("extra") for k in kinds
        }
        self._signers: list[str] = list(supported["signers"].get("eip155:*", []))

    @property
    def networks(self) -> list[str]:
        """The networks the engine settles ``exact`` on, in this x402 version."""
        return list(self._extra)

    def get_extra(self, network: str) -> dict[str, Any] | None:
        return self._extra.get(network)

    def get_signers(self, network: str) -> list[str]:
        return list(self._signers)

    def _verify(self, payload: Any, requirements: Any) -> VerifyResponse:
        answer = self.answers.take("verify", payload)
        if answer is None:
            answer = self._handle.verify(_wire(payload), _wire(requirements))
        return verify_response(*answer)

    def _settle(self, payload: Any, requirements: Any) -> SettleResponse:
        answer = self.answers.take("settle", payload)
        if answer is None:
            answer = self._handle.settle(_wire(payload), _wire(requirements))
        return settle_response(answer, requirements.network)


class BatchedExactEvm(_Mechanism):
    """x402 v2 ``exact`` on ``eip155:*``, settled in batches by the engine (implements the
    SDK's ``SchemeNetworkFacilitator``)."""

    def __init__(self, handle: EngineHandle) -> None:
        super().__init__(handle, 2)

    def verify(
        self,
        payload: PaymentPayload,
        requirements: PaymentRequirements,
        context: FacilitatorContext | None = None,
    ) -> VerifyResponse:
        return self._verify(payload, requirements)

    def settle(
        self,
        payload: PaymentPayload,
        requirements: PaymentRequirements,
        context: FacilitatorContext | None = None,
    ) -> SettleResponse:
        return self._settle(payload, requirements)


class BatchedExactEvmV1(_Mechanism):
    """x402 v1 ``exact`` on the engine's v1 network names (the SDK's
    ``SchemeNetworkFacilitatorV1``)."""

    def __init__(self, handle: EngineHandle) -> None:
        super().__init__(handle, 1)

    def verify(
        self,
        payload: PaymentPayloadV1,
        requirements: PaymentRequirementsV1,
        context: FacilitatorContext | None = None,
    ) -> VerifyResponse:
        return self._verify(payload, requirements)

    def settle(
        self,
        payload: PaymentPayloadV1,
        requirements: PaymentRequirementsV1,
        context: FacilitatorContext | None = None,
    ) -> SettleResponse:
        return self._settle(payload, requirements)


async def _engine_call(handle: EngineHandle, fn: Callable[..., Any], *args: Any) -> Any:
    """Await an engine method from an asyncio loop: started in the engine's thread, answered
    through this loop's future (no thread per call)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle_future(outcome: Any) -> None:
        if future.done():  # the caller gave up (cancelled): nothing to hand over
            return
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

    def done(outcome: Any) -> None:  # in the engine's thread
        loop.call_soon_threadsafe(settle_future, outcome)

    handle.start(fn, *args, done=done)
    return await future


def _async_hooks(
    facilitator: x402Facilitator,
    handle: EngineHandle,
    v2: BatchedExactEvm,
    v1: BatchedExactEvmV1,
) -> None:
    """Before-hooks that do the engine's work off the event loop (see the module text)."""

    def ours(payload: Any) -> _Mechanism | None:
        """Our mechanism, if the SDK will route this payload to it."""
        scheme, network = payload.get_scheme(), payload.get_network()
        routed: object = (
            facilitator._find_facilitator_v1(scheme, network)
            if payload.x402_version == 1
            else facilitator._find_facilitator(scheme, network)
        )
        if routed is v2:
            return v2
        return v1 if routed is v1 else None

    async def before_verify(context: Any) -> None:
        mechanism = ours(context.payment_payload)
        # As the last hook only: a later one could abort, leaving the answer unclaimed.
        if mechanism is not None and facilitator._before_verify_hooks[-1] is before_verify:
            payload, requirements = context.payment_payload, context.requirements
            engine = handle.engine
            answer = await _engine_call(handle, engine.verify, _wire(payload), _wire(requirements))
            mechanism.answers.put("verify", payload, answer)

    async def before_settle(context: Any) -> None:
        mechanism = ours(context.payment_payload)
        # Only as the last hook: one after it could abort a payment this one already sold.
        if mechanism is not None and facilitator._before_settle_hooks[-1] is before_settle:
            payload, requirements = context.payment_payload, context.requirements
            engine = handle.engine
            answer = await _engine_call(handle, engine.settle, _wire(payload), _wire(requirements))
            mechanism.answers.put("settle", payload, answer)

    facilitator.on_before_verify(_hook(before_verify))
    facilitator.on_before_settle(_hook(before_settle))


def _hook(fn: Callable[[Any], Coroutine[Any, Any, None]]) -> Any:
    return fn  # the SDK's hook types are unions of sync and async callables


def register_batched_exact_evm(
    facilitator: x402Facilitator | x402FacilitatorSync, handle: EngineHandle
) -> tuple[BatchedExactEvm, BatchedExactEvmV1]:
    """Register the engine's ``exact`` mechanisms on every network it is configured for (v2
    ``eip155:<id>``, and its v1 names) in an SDK facilitator, sync or asyncio. Register it in
    place of the SDK's ``register_exact_evm_facilitator``: the SDK routes a payment to the
    first mechanism registered for its network."""
    v2, v1 = BatchedExactEvm(handle), BatchedExactEvmV1(handle)
    if v2.networks:
        facilitator.register(v2.networks, v2)
    if v1.networks:
        facilitator.register_v1(v1.networks, v1)
    if isinstance(facilitator, x402Facilitator):
        _async_hooks(facilitator, handle, v2, v1)
    return v2, v1
