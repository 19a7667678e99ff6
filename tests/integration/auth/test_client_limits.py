"""Per-client limits and message-size limits answer RESOURCE_EXHAUSTED."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from prometheus_client import REGISTRY

from copyfree.v1 import gateway_pb2
from tests.integration.auth.conftest import (
    CHECKER,
    ONE_AT_A_TIME,
    SLOW_RATE,
    SecureStack,
    bearer,
)

pytestmark = [pytest.mark.redis, pytest.mark.asyncio(loop_scope="module")]
REGISTER = {"method": "/copyfree.v1.GatewayService/Register"}


async def test_a_client_over_its_in_flight_limit_is_refused_others_are_not(
    stack: SecureStack,
) -> None:
    """A Register stream left open holds the client's only slot (no timing)."""
    stub = stack.gateway_stub()
    release = asyncio.Event()

    async def held_open() -> AsyncIterator[gateway_pb2.RegisterRequest]:
        await release.wait()
        return
        yield  # an async generator that sends nothing until released

    held = stub.Register(held_open(), timeout=30, metadata=bearer(ONE_AT_A_TIME))
    in_flight = asyncio.ensure_future(held)
    try:
        # Admission happens in the same event-loop step as the in-flight gauge's
        # increment, so once the gauge shows the held call, its slot is taken.
        for _ in range(500):  # bounded wait for the server to start the call
            if REGISTRY.get_sample_value("copyfree_rpc_in_flight", REGISTER):
                break
            await asyncio.sleep(0.01)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Check(
                gateway_pb2.CheckRequest(image=stack.images["reg-0"]),
                timeout=10,
                metadata=bearer(ONE_AT_A_TIME),
            )
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "one-at-a-time" in (err.value.details() or "")
        # Another client is unaffected.
        ok = await stub.Check(
            gateway_pb2.CheckRequest(image=stack.images["reg-0"]),
            timeout=10,
            metadata=bearer(CHECKER),
        )
        assert ok.verdict == gateway_pb2.VERDICT_REGISTERED
    finally:
        release.set()
    with pytest.raises(grpc.aio.AioRpcError) as empty:
        await in_flight
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # no messages
    # The slot is free again.
    again = await stub.Check(
        gateway_pb2.CheckRequest(image=stack.images["reg-0"]),
        timeout=10,
        metadata=bearer(ONE_AT_A_TIME),
    )
    assert again.match.id == "reg-0"


async def test_a_client_over_its_rate_is_refused(stack: SecureStack) -> None:
    stub = stack.gateway_stub()
    request = gateway_pb2.CheckRequest(image=stack.images["reg-2"])
    first = await stub.Check(request, timeout=10, metadata=bearer(SLOW_RATE))
    assert first.match.id == "reg-2"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Check(request, timeout=10, metadata=bearer(SLOW_RATE))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "rate limit" in (err.value.details() or "")


async def test_a_message_over_the_size_limit_is_refused(stack: SecureStack) -> None:
    limit = stack.gateway_settings.max_message_bytes
    big = gateway_pb2.CheckRequest(image=bytes(limit + 1))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.gateway_stub().Check(big, timeout=10, metadata=bearer(CHECKER))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
