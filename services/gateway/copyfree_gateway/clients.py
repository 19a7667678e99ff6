"""Typed clients for the encoder and the index shards: a deadline on every call (the
configured timeout, cut to what is left of the caller's own deadline), the caller's
request id and the gateway's own bearer token forwarded, TLS when configured,
downstream failures turned into domain errors, client-side latency metrics."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from copyfree import errors
from copyfree.serving.auth import AUTH_HEADER
from copyfree.serving.interceptors import REQUEST_ID_HEADER, call_deadline
from copyfree.serving.logging import request_id
from copyfree.serving.metrics import UPSTREAM_SECONDS
from copyfree.serving.server import channel_options
from copyfree.v1 import encoder_pb2, encoder_pb2_grpc, index_pb2, index_pb2_grpc

T = TypeVar("T")

# Retries only for UNAVAILABLE, declared in the service config (never hand-rolled).
_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [
                    {"service": "copyfree.v1.EncoderService"},
                    {"service": "copyfree.v1.IndexService", "method": "Detect"},
                    {"service": "copyfree.v1.IndexService", "method": "Similar"},
                    {"service": "copyfree.v1.IndexService", "method": "Stats"},
                ],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "0.5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)

_PASS_THROUGH = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidInput,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceeded,
}


@dataclass(frozen=True)
class Upstream:
    """How every outbound channel is made and what each call carries."""

    timeout_s: float
    max_message_bytes: int
    token: str | None = None  # the gateway's own bearer token
    credentials: grpc.ChannelCredentials | None = None  # None = plaintext
    server_name: str = ""  # TLS name override (certificate names the Service)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        md: list[tuple[str, str]] = []
        rid = request_id.get()
        if rid:
            md.append((REQUEST_ID_HEADER, rid))
        if self.token:
            md.append((AUTH_HEADER, f"Bearer {self.token}"))
        return tuple(md)

    def timeout(self) -> float:
        """The configured timeout, never past the incoming call's deadline."""
        deadline = call_deadline.get()
        if deadline is None:
            return self.timeout_s
        left = deadline - time.monotonic()
        if left <= 0:
            raise errors.DeadlineExceeded("the caller's deadline has passed")
        return min(self.timeout_s, left)


def make_channel(address: str, upstream: Upstream) -> grpc.aio.Channel:
    options = [
        *channel_options(upstream.max_message_bytes),
        ("grpc.service_config", _SERVICE_CONFIG),
        ("grpc.enable_retries", 1),
        # A restarted shard or encoder is back within seconds: do not let the channel's
        # reconnect backoff (default up to 120 s) keep failing calls after that.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]
    if upstream.credentials is None:
        return grpc.aio.insecure_channel(address, options=options)
    if upstream.server_name:
        options.append(("grpc.ssl_target_name_override", upstream.server_name))
    return grpc.aio.secure_channel(address, upstream.credentials, options=options)


async def _call(
    target: str,
    what: str,
    method: str,
    rpc: Callable[..., Awaitable[T]],
    request: Any,
    upstream: Upstream,
) -> T:
    start, code = time.perf_counter(), "OK"
    try:
        return await rpc(
            request, timeout=upstream.timeout(), metadata=upstream.metadata()
        )
    except grpc.aio.AioRpcError as e:
        code = e.code().name
        cls = _PASS_THROUGH.get(e.code())
        if cls is not None:
            raise cls(e.details() or e.code().name) from None
        raise errors.Unavailable(
            f"{what} failed: {e.code().name}: {e.details()}"
        ) from None
    finally:
        UPSTREAM_SECONDS.labels(target, method, code).observe(
            time.perf_counter() - start
        )


class EncoderClient:
    def __init__(self, address: str, upstream: Upstream) -> None:
        self.address = address
        self._upstream = upstream
        self._channel = make_channel(address, upstream)
        self._stub = encoder_pb2_grpc.EncoderServiceStub(self._channel)
        self._what = f"encoder at {address}"

    async def _call(self, method: str, request: Any) -> Any:
        rpc = getattr(self._stub, method)
        return await _call("encoder", self._what, method, rpc, request, self._upstream)

    async def encode(self, image: bytes, outputs: list[int]) -> encoder_pb2.Encoding:
        reply: encoder_pb2.EncodeResponse = await self._call(
            "Encode", encoder_pb2.EncodeRequest(image=image, outputs=outputs)
        )
        return reply.encoding

    async def encode_batch(
        self, images: list[bytes], outputs: list[int]
    ) -> list[encoder_pb2.EncodeResult]:
        reply: encoder_pb2.EncodeBatchResponse = await self._call(
            "EncodeBatch",
            encoder_pb2.EncodeBatchRequest(images=images, outputs=outputs),
        )
        return list(reply.results)

    async def model_info(self) -> encoder_pb2.ModelInfoResponse:
        reply: encoder_pb2.ModelInfoResponse = await self._call(
            "ModelInfo", encoder_pb2.ModelInfoRequest()
        )
        return reply

    async def close(self) -> None:
        await self._channel.close()


class IndexClient:
    """One shard."""

    def __init__(self, shard_id: int, address: str, upstream: Upstream) -> None:
        self.shard_id, self.address = shard_id, address
        self._upstream = upstream
        self._channel = make_channel(address, upstream)
        self._stub = index_pb2_grpc.IndexServiceStub(self._channel)
        self._what = f"index shard {shard_id} at {address}"
        self._target = f"index-{shard_id}"

    async def _call(self, method: str, request: Any) -> Any:
        rpc = getattr(self._stub, method)
        return await _call(
            self._target, self._what, method, rpc, request, self._upstream
        )

    async def upsert(
        self, request: index_pb2.UpsertRequest
    ) -> index_pb2.UpsertResponse:
        reply: index_pb2.UpsertResponse = await self._call("Upsert", request)
        return reply

    async def delete(
        self, request: index_pb2.DeleteRequest
    ) -> index_pb2.DeleteResponse:
        reply: index_pb2.DeleteResponse = await self._call("Delete", request)
        return reply

    async def detect(
        self, request: index_pb2.DetectRequest
    ) -> index_pb2.DetectResponse:
        reply: index_pb2.DetectResponse = await self._call("Detect", request)
        return reply

    async def similar(
        self, request: index_pb2.SimilarRequest
    ) -> index_pb2.SimilarResponse:
        reply: index_pb2.SimilarResponse = await self._call("Similar", request)
        return reply

    async def stats(self) -> index_pb2.StatsResponse:
        reply: index_pb2.StatsResponse = await self._call(
            "Stats", index_pb2.StatsRequest()
        )
        return reply

    async def close(self) -> None:
        await self._channel.close()
