"""The one place where domain errors become gRPC statuses; also request ids, access log
lines and latency metrics for every unary and client-streaming call."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from copyfree.errors import CopyfreeError
from copyfree.serving.logging import request_id
from copyfree.serving.metrics import RPC_SECONDS

log = logging.getLogger(__name__)
REQUEST_ID_HEADER = "x-request-id"


def _incoming_request_id(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str) and value:
            return value[:128]
    return uuid.uuid4().hex[:16]


class ObservabilityInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = details.method
        if handler is None or method.startswith(("/grpc.health", "/grpc.reflection")):
            return handler
        if handler.unary_unary is not None:
            inner = handler.unary_unary
            return grpc.unary_unary_rpc_method_handler(
                _wrap(inner, method),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.stream_unary is not None:
            inner = handler.stream_unary
            return grpc.stream_unary_rpc_method_handler(
                _wrap(inner, method),
                handler.request_deserializer,
                handler.response_serializer,
            )
        return handler


def _wrap(inner: Callable[..., Any], method: str) -> Callable[..., Any]:
    async def behavior(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        start, code = time.perf_counter(), grpc.StatusCode.OK
        token = request_id.set(_incoming_request_id(context))
        try:
            return await inner(request, context)
        except CopyfreeError as e:
            code = grpc.StatusCode[e.status]
            await context.abort(code, str(e))
        except grpc.aio.AbortError:
            code = context.code() or grpc.StatusCode.UNKNOWN  # type: ignore[assignment]
            raise  # gRPC: never suppress AbortError
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log.exception("unhandled error in %s", method)
            await context.abort(code, f"internal error (request_id={request_id.get()})")
        finally:
            elapsed = time.perf_counter() - start
            RPC_SECONDS.labels(method, code.name).observe(elapsed)
            log.debug("%s %s %.1fms", method, code.name, elapsed * 1000)
            request_id.reset(token)

    return behavior
