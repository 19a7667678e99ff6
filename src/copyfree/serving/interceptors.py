"""The one place where domain errors become gRPC statuses. Also, for every unary and
client-streaming call: request id, caller authentication and scope check, per-client
limits, the incoming deadline (so outbound calls never outlive it), an access log line
and latency metrics. Health and reflection pass through untouched (always open)."""

from __future__ import annotations

import contextvars
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from copyfree.errors import CopyfreeError
from copyfree.serving.auth import (
    OPEN_PREFIXES,
    Principal,
    TokenTable,
    authorize,
    current_client,
)
from copyfree.serving.limits import ClientLimiter, Limits
from copyfree.serving.logging import request_id
from copyfree.serving.metrics import RPC_IN_FLIGHT, RPC_REJECTED, RPC_SECONDS

log = logging.getLogger(__name__)
REQUEST_ID_HEADER = "x-request-id"

# time.monotonic() by which the call being served must be answered (None = no
# deadline); outbound clients cap their own timeouts by it.
call_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "call_deadline", default=None
)


def _incoming_request_id(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str) and value:
            return value[:128]
    return uuid.uuid4().hex[:16]


def _peer_host(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """'ipv4:10.0.0.7:51234' -> 'ipv4:10.0.0.7' (limits key for anonymous callers)."""
    peer = context.peer() or "unknown"
    return peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer


class ObservabilityInterceptor(grpc.aio.ServerInterceptor):
    """tokens=None: auth off. limiter=None: no per-client limits."""

    def __init__(
        self,
        *,
        tokens: TokenTable | None = None,
        limiter: ClientLimiter | None = None,
        access_log: bool = False,
    ) -> None:
        self._tokens, self._limiter = tokens, limiter
        self._access_level = logging.INFO if access_log else logging.DEBUG

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = details.method
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap(handler.unary_unary, method),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap(handler.stream_unary, method),
                handler.request_deserializer,
                handler.response_serializer,
            )
        return handler

    def _admit(
        self, method: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tuple[str, Limits | None, Principal | None]:
        """Authenticate + authorize (when tokens are configured), then take a limit
        slot. Returns the limiter key, the limits that apply to it and the caller."""
        principal: Principal | None = None
        if self._tokens is not None:
            try:
                principal = self._tokens.authenticate(context.invocation_metadata())
            except CopyfreeError:
                RPC_REJECTED.labels("unauthenticated").inc()
                raise
            try:
                authorize(principal, method)
            except CopyfreeError:
                RPC_REJECTED.labels("permission_denied").inc()
                raise
        key = principal.client if principal is not None else _peer_host(context)
        limits = None
        if self._limiter is not None:
            if principal is not None and (
                principal.max_in_flight is not None or principal.rate_per_s is not None
            ):
                d = self._limiter.default
                limits = Limits(
                    principal.max_in_flight
                    if principal.max_in_flight is not None
                    else d.max_in_flight,
                    principal.rate_per_s
                    if principal.rate_per_s is not None
                    else d.rate_per_s,
                    d.burst,
                )
            self._limiter.acquire(key, limits)
        return key, limits, principal

    def _wrap(self, inner: Callable[..., Any], method: str) -> Callable[..., Any]:
        async def behavior(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> Any:
            start, code = time.perf_counter(), grpc.StatusCode.OK
            rid_token = request_id.set(_incoming_request_id(context))
            remaining = context.time_remaining()
            deadline_token = call_deadline.set(
                time.monotonic() + remaining if remaining is not None else None
            )
            client_token = current_client.set("")
            admitted: tuple[str, Limits | None] | None = None
            in_flight = RPC_IN_FLIGHT.labels(method)
            in_flight.inc()
            try:
                key, limits, principal = self._admit(method, context)
                admitted = key, limits
                if principal is not None:
                    current_client.set(principal.client)
                return await inner(request, context)
            except CopyfreeError as e:
                code = grpc.StatusCode[e.status]
                await context.abort(code, str(e))
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise  # gRPC: never suppress AbortError
            except Exception:
                code = grpc.StatusCode.INTERNAL
                log.exception("unhandled error in %s", method)
                await context.abort(
                    code, f"internal error (request_id={request_id.get()})"
                )
            finally:
                in_flight.dec()
                if admitted is not None and self._limiter is not None:
                    self._limiter.release(*admitted)
                elapsed = time.perf_counter() - start
                RPC_SECONDS.labels(method, code.name).observe(elapsed)
                if log.isEnabledFor(self._access_level):
                    log.log(
                        self._access_level,
                        "%s %s %.1fms",
                        method,
                        code.name,
                        elapsed * 1000,
                        extra={
                            "method": method,
                            "code": code.name,
                            "duration_ms": round(elapsed * 1000, 3),
                            "client": current_client.get()
                            or (admitted[0] if admitted else ""),
                        },
                    )
                current_client.reset(client_token)
                call_deadline.reset(deadline_token)
                request_id.reset(rid_token)

        return behavior
