"""Typed clients for the encoder and the index shards: deadlines on every call, the
caller's request id forwarded, downstream failures turned into domain errors."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from copyfree import errors
from copyfree.serving.interceptors import REQUEST_ID_HEADER
from copyfree.serving.logging import request_id
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


def make_channel(address: str, max_message_bytes: int) -> grpc.aio.Channel:
    options = [
        *channel_options(max_message_bytes),
        ("grpc.service_config", _SERVICE_CONFIG),
        ("grpc.enable_retries", 1),
        # A restarted shard or encoder is back within seconds: do not let the channel's
        # reconnect backoff (default up to 120 s) keep failing calls after that.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]
    return grpc.aio.insecure_channel(address, options=options)


def _metadata() -> tuple[tuple[str, str], ...]:
    rid = request_id.get()
    return ((REQUEST_ID_HEADER, rid),) if rid else ()


async def _call(
    what: str, rpc: Callable[..., Awaitable[T]], request: Any, timeout_s: float
) -> T:
    try:
        return await rpc(request, timeout=timeout_s, metadata=_metadata())
    except grpc.aio.AioRpcError as e:
        cls = _PASS_THROUGH.get(e.code())
        if cls is not None:
            raise cls(e.details() or e.code().name) from None
        raise errors.Unavailable(
            f"{what} failed: {e.code().name}: {e.details()}"
        ) from None


class EncoderClient:
    def __init__(self, address: str, timeout_s: float, max_message_bytes: int) -> None:
        self.address = address
        self._channel = make_channel(address, max_message_bytes)
        self._stub = encoder_pb2_grpc.EncoderServiceStub(self._channel)
        self._timeout_s = timeout_s

    async def encode(self, image: bytes, outputs: list[int]) -> encoder_pb2.Encoding:
        reply = await _call(
            f"encoder at {self.address}",
            self._stub.Encode,
            encoder_pb2.EncodeRequest(image=image, outputs=outputs),
            self._timeout_s,
        )
        return reply.encoding

    async def encode_batch(
        self, images: list[bytes], outputs: list[int]
    ) -> list[encoder_pb2.EncodeResult]:
        reply = await _call(
            f"encoder at {self.address}",
            self._stub.EncodeBatch,
            encoder_pb2.EncodeBatchRequest(images=images, outputs=outputs),
            self._timeout_s,
        )
        return list(reply.results)

    async def model_info(self) -> encoder_pb2.ModelInfoResponse:
        return await _call(
            f"encoder at {self.address}",
            self._stub.ModelInfo,
            encoder_pb2.ModelInfoRequest(),
            self._timeout_s,
        )

    async def close(self) -> None:
        await self._channel.close()


class IndexClient:
    """One shard."""

    def __init__(
        self, shard_id: int, address: str, timeout_s: float, max_message_bytes: int
    ) -> None:
        self.shard_id, self.address = shard_id, address
        self._channel = make_channel(address, max_message_bytes)
        self._stub = index_pb2_grpc.IndexServiceStub(self._channel)
        self._timeout_s = timeout_s
        self._what = f"index shard {shard_id} at {address}"

    async def upsert(
        self, request: index_pb2.UpsertRequest
    ) -> index_pb2.UpsertResponse:
        return await _call(self._what, self._stub.Upsert, request, self._timeout_s)

    async def delete(
        self, request: index_pb2.DeleteRequest
    ) -> index_pb2.DeleteResponse:
        return await _call(self._what, self._stub.Delete, request, self._timeout_s)

    async def detect(
        self, request: index_pb2.DetectRequest
    ) -> index_pb2.DetectResponse:
        return await _call(self._what, self._stub.Detect, request, self._timeout_s)

    async def similar(
        self, request: index_pb2.SimilarRequest
    ) -> index_pb2.SimilarResponse:
        return await _call(self._what, self._stub.Similar, request, self._timeout_s)

    async def stats(self) -> index_pb2.StatsResponse:
        return await _call(
            self._what, self._stub.Stats, index_pb2.StatsRequest(), self._timeout_s
        )

    async def close(self) -> None:
        await self._channel.close()
