"""The audit log records every Check in Redis and ListAudit (admin only) reads it."""

from __future__ import annotations

import hashlib
import socket

import grpc
import pytest

from copyfree.v1 import gateway_pb2, gateway_pb2_grpc
from copyfree_gateway.__main__ import start as start_gateway
from tests.integration.auth.conftest import (
    ADMIN,
    CHECKER,
    SecureStack,
    bearer,
    gateway_settings,
)

pytestmark = [pytest.mark.redis, pytest.mark.asyncio(loop_scope="module")]


async def _list(stack: SecureStack, **fields: object) -> gateway_pb2.ListAuditResponse:
    reply: gateway_pb2.ListAuditResponse = await stack.gateway_stub().ListAudit(
        gateway_pb2.ListAuditRequest(**fields),  # type: ignore[arg-type]
        timeout=10,
        metadata=bearer(ADMIN),
    )
    return reply


async def test_a_check_is_recorded_with_caller_verdict_distances_and_model(
    stack: SecureStack,
) -> None:
    image = stack.images["reg-4"]
    reply = await stack.gateway_stub().Check(
        gateway_pb2.CheckRequest(image=image),
        timeout=10,
        metadata=bearer(CHECKER, **{"x-request-id": "audit-me-1"}),
    )
    entries = (await _list(stack, limit=20)).entries
    (entry,) = [e for e in entries if e.request_id == "audit-me-1"]
    assert entry.caller == "teacher-portal"
    assert entry.status == "OK"
    assert entry.verdict == gateway_pb2.VERDICT_REGISTERED
    assert entry.matched_id == "reg-4" and entry.collection == "registry"
    assert entry.hamming == reply.match.hamming
    assert entry.cosine == pytest.approx(reply.match.cosine)
    assert entry.evidence == reply.evidence  # stage, candidates, thresholds
    assert entry.detection_model == reply.evidence.model
    assert entry.detection_model.version
    assert entry.image_sha256 == hashlib.sha256(image).hexdigest()
    assert entry.time_unix_ms > 0 and entry.id


async def test_unverified_and_failed_checks_are_recorded_too(
    stack: SecureStack,
) -> None:
    stub = stack.gateway_stub()
    await stub.Check(
        gateway_pb2.CheckRequest(image=stack.images["unregistered"], top_n=2),
        timeout=10,
        metadata=bearer(CHECKER, **{"x-request-id": "audit-me-2"}),
    )
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Check(
            gateway_pb2.CheckRequest(image=b"not an image"),
            timeout=10,
            metadata=bearer(CHECKER, **{"x-request-id": "audit-me-3"}),
        )
    by_rid = {e.request_id: e for e in (await _list(stack, limit=50)).entries}
    unverified, failed = by_rid["audit-me-2"], by_rid["audit-me-3"]
    assert unverified.verdict == gateway_pb2.VERDICT_UNVERIFIED
    assert not unverified.matched_id and len(unverified.recommended_ids) == 2
    assert unverified.retrieval_model.version
    assert failed.status == "INVALID_ARGUMENT"
    assert failed.verdict == gateway_pb2.VERDICT_UNSPECIFIED


async def test_list_audit_pages_newest_first_and_filters_by_caller(
    stack: SecureStack,
) -> None:
    stub = stack.gateway_stub()
    for i in range(3):
        await stub.Check(
            gateway_pb2.CheckRequest(image=stack.images["reg-5"]),
            timeout=10,
            metadata=bearer(CHECKER, **{"x-request-id": f"page-{i}"}),
        )
    first = await _list(stack, limit=2)
    assert [e.request_id for e in first.entries] == ["page-2", "page-1"]
    second = await _list(stack, limit=2, before=first.next_cursor)
    assert second.entries[0].request_id == "page-0"
    assert all(e.caller == "teacher-portal" for e in first.entries)
    assert (await _list(stack, caller="nobody")).entries == []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _list(stack, limit=5000)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_list_audit_needs_the_admin_scope(stack: SecureStack) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.gateway_stub().ListAudit(
            gateway_pb2.ListAuditRequest(), timeout=10, metadata=bearer(CHECKER)
        )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("fail_open", [False, True])
async def test_an_unreachable_audit_log_fails_checks_closed_unless_fail_open(
    stack: SecureStack, fail_open: bool
) -> None:
    parts = {
        "certs": stack.certs,
        "encoder_addr": stack.encoder_addr,
        "index_addr": stack.index_addr,
        "redis_url": f"redis://127.0.0.1:{_closed_port()}/0",
    }
    settings = gateway_settings(parts, audit_fail_open=fail_open)
    running, servicer = await start_gateway(settings)
    try:
        async with grpc.aio.secure_channel(
            f"127.0.0.1:{running.port}",
            grpc.ssl_channel_credentials(stack.certs.ca.read_bytes()),
        ) as ch:
            call = gateway_pb2_grpc.GatewayServiceStub(ch).Check(
                gateway_pb2.CheckRequest(image=stack.images["reg-1"]),
                timeout=20,
                metadata=bearer(CHECKER),
            )
            if fail_open:
                assert (await call).match.id == "reg-1"
            else:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "audit" in (err.value.details() or "")
    finally:
        await running.stop()
        await servicer.close()


async def test_audit_off_answers_list_audit_with_failed_precondition(
    stack: SecureStack,
) -> None:
    parts = {
        "certs": stack.certs,
        "encoder_addr": stack.encoder_addr,
        "index_addr": stack.index_addr,
        "redis_url": "",
    }
    running, servicer = await start_gateway(gateway_settings(parts))
    try:
        async with grpc.aio.secure_channel(
            f"127.0.0.1:{running.port}",
            grpc.ssl_channel_credentials(stack.certs.ca.read_bytes()),
        ) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await gateway_pb2_grpc.GatewayServiceStub(ch).ListAudit(
                    gateway_pb2.ListAuditRequest(), timeout=10, metadata=bearer(ADMIN)
                )
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "GATEWAY_REDIS_URL" in (err.value.details() or "")
    finally:
        await running.stop()
        await servicer.close()
