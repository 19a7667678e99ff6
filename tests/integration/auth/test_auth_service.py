"""Bearer tokens, scopes and TLS through the real gRPC surfaces of a secured stack."""

from __future__ import annotations

import logging
import socket

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import generate_latest

from copyfree.serving.logging import request_id
from copyfree.serving.server import start_server
from copyfree.serving.settings import ServiceSettings
from copyfree.v1 import (
    encoder_pb2,
    encoder_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    index_pb2,
    index_pb2_grpc,
)
from tests.integration.auth.conftest import (
    ADMIN,
    CHECKER,
    GATEWAY,
    REGISTRAR,
    Certs,
    SecureStack,
    bearer,
    tls_settings,
)

pytestmark = [pytest.mark.redis, pytest.mark.asyncio(loop_scope="module")]


async def test_check_without_a_token_is_unauthenticated(stack: SecureStack) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.gateway_stub().Check(
            gateway_pb2.CheckRequest(image=stack.images["reg-1"]), timeout=10
        )
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization" in (err.value.details() or "")


@pytest.mark.parametrize(
    "metadata",
    [
        (("authorization", "Bearer not-a-known-token-at-all"),),
        (("authorization", f"Basic {CHECKER}"),),
        (("authorization", "Bearer "),),
    ],
)
async def test_check_with_a_bad_token_is_unauthenticated(
    stack: SecureStack, metadata: tuple[tuple[str, str], ...]
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.gateway_stub().Check(
            gateway_pb2.CheckRequest(image=stack.images["reg-1"]),
            timeout=10,
            metadata=metadata,
        )
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    ("token", "call"),
    [
        (REGISTRAR, "Check"),  # register scope cannot check
        (CHECKER, "Stats"),  # check scope is not admin
        (CHECKER, "Delete"),  # nor register
        (ADMIN, "Check"),  # admin does not imply check
    ],
)
async def test_a_valid_token_without_the_scope_is_permission_denied(
    stack: SecureStack, token: str, call: str
) -> None:
    stub = stack.gateway_stub()
    request = {
        "Check": gateway_pb2.CheckRequest(image=stack.images["reg-1"]),
        "Stats": gateway_pb2.GatewayStatsRequest(),
        "Delete": gateway_pb2.GatewayDeleteRequest(collection="registry", ids=["x"]),
    }[call]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await getattr(stub, call)(request, timeout=10, metadata=bearer(token))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert call in (err.value.details() or "")


async def test_valid_tokens_with_their_scopes_are_served_end_to_end(
    stack: SecureStack,
) -> None:
    """The gateway reaches encoder and index (TLS, mutual, token-checked) with its own
    token: the client's token never leaves the gateway."""
    stub = stack.gateway_stub()
    reply = await stub.Check(
        gateway_pb2.CheckRequest(image=stack.images["reg-3"]),
        timeout=10,
        metadata=bearer(CHECKER),
    )
    assert reply.verdict == gateway_pb2.VERDICT_REGISTERED
    assert reply.match.id == "reg-3"
    unverified = await stub.Check(
        gateway_pb2.CheckRequest(image=stack.images["unregistered"], top_n=3),
        timeout=10,
        metadata=bearer(CHECKER),
    )
    assert unverified.verdict == gateway_pb2.VERDICT_UNVERIFIED
    assert len(unverified.recommendations) == 3
    stats = await stub.Stats(
        gateway_pb2.GatewayStatsRequest(), timeout=10, metadata=bearer(ADMIN)
    )
    assert stats.shards[0].ready


async def test_health_and_reflection_need_no_token(stack: SecureStack) -> None:
    for address, service in (
        (stack.gateway_addr, "copyfree.v1.GatewayService"),
        (stack.encoder_addr, "copyfree.v1.EncoderService"),
    ):
        ch = stack.channel(address)
        if address == stack.encoder_addr:
            # Mutual TLS: without a client certificate the handshake itself fails.
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=5
                )
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            continue
        health = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        replies = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
            timeout=5,
        )
        names = [
            s.name async for r in replies for s in r.list_services_response.service
        ]
        assert service in names


def _mtls_channel(stack: SecureStack, address: str) -> grpc.aio.Channel:
    c = stack.certs
    creds = grpc.ssl_channel_credentials(
        c.ca.read_bytes(), c.client_key.read_bytes(), c.client_cert.read_bytes()
    )
    return grpc.aio.secure_channel(address, creds)


async def test_encoder_and_index_accept_only_the_gateway_token(
    stack: SecureStack,
) -> None:
    async with _mtls_channel(stack, stack.encoder_addr) as ch:
        enc = encoder_pb2_grpc.EncoderServiceStub(ch)
        request = encoder_pb2.ModelInfoRequest()
        for metadata in ((), bearer(CHECKER)):  # a gateway client's token: unknown
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await enc.ModelInfo(request, timeout=5, metadata=metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        info = await enc.ModelInfo(request, timeout=5, metadata=bearer(GATEWAY))
        assert {m.kind for m in info.models} == {"detection", "retrieval"}
    async with _mtls_channel(stack, stack.index_addr) as ch:
        idx = index_pb2_grpc.IndexServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await idx.Stats(index_pb2.StatsRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        stats = await idx.Stats(
            index_pb2.StatsRequest(), timeout=5, metadata=bearer(GATEWAY)
        )
        assert stats.ready


async def test_plaintext_clients_cannot_talk_to_a_tls_server(
    stack: SecureStack,
) -> None:
    async with grpc.aio.insecure_channel(stack.gateway_addr) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


class _Capture(logging.Handler):
    """(logger, method, request id) of each access-log line, as emitted."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        method = record.__dict__.get("method")
        if method:
            self.lines.append((method, request_id.get()))


async def test_request_id_travels_from_gateway_to_encoder_and_index(
    stack: SecureStack,
) -> None:
    capture = _Capture()
    logger = logging.getLogger("copyfree.serving.interceptors")
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(capture)
    try:
        reply = await stack.gateway_stub().Check(
            gateway_pb2.CheckRequest(image=stack.images["unregistered"]),
            timeout=10,
            metadata=bearer(CHECKER, **{"x-request-id": "trace-me-42"}),
        )
    finally:
        logger.removeHandler(capture)
        logger.setLevel(old_level)
    assert reply.request_id == "trace-me-42"
    seen = {method for method, rid in capture.lines if rid == "trace-me-42"}
    assert {
        "/copyfree.v1.GatewayService/Check",
        "/copyfree.v1.EncoderService/Encode",
        "/copyfree.v1.IndexService/Detect",
        "/copyfree.v1.IndexService/Similar",
    } <= seen


async def test_health_port_serves_plaintext_health_only(certs: Certs) -> None:
    """Kubelet probes cannot speak TLS: the health port answers them in plaintext,
    with the main port's status, and offers nothing else."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        health_port = int(s.getsockname()[1])
    settings = ServiceSettings(
        **tls_settings(certs, mutual=True), health_port=health_port
    )
    running = await start_server(settings, [])
    try:
        assert running.health_port == health_port
        async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as ch:
            reply = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await gateway_pb2_grpc.GatewayServiceStub(ch).Stats(
                    gateway_pb2.GatewayStatsRequest(), timeout=5
                )
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        await running.stop()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as ch:
            with pytest.raises(grpc.aio.AioRpcError):  # stopped with the server
                await health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(), timeout=2
                )
    finally:
        await running.stop()


async def test_metrics_cover_rpcs_upstream_calls_batches_items_and_models(
    stack: SecureStack,
) -> None:
    """All three services run in this process, so one registry holds their metrics."""
    await stack.gateway_stub().Check(
        gateway_pb2.CheckRequest(image=stack.images["reg-2"]),
        timeout=10,
        metadata=bearer(CHECKER),
    )
    with pytest.raises(grpc.aio.AioRpcError):
        await stack.gateway_stub().Check(gateway_pb2.CheckRequest(), timeout=10)
    text = generate_latest().decode()
    for needle in (
        'copyfree_rpc_duration_seconds_bucket{code="OK",'
        'le="0.5",method="/copyfree.v1.GatewayService/Check"}',
        'copyfree_rpc_duration_seconds_count{code="UNAUTHENTICATED",'
        'method="/copyfree.v1.GatewayService/Check"}',
        'copyfree_upstream_duration_seconds_count{code="OK",method="Encode",'
        'target="encoder"}',
        'copyfree_upstream_duration_seconds_count{code="OK",method="Detect",'
        'target="index-0"}',
        'copyfree_rpc_rejected_total{reason="unauthenticated"}',
        "copyfree_encoder_batch_size_count",
        'copyfree_index_items{collection="registry",shard="0"} 6.0',
        'copyfree_model_info{kind="detection",name="tiny-detection"',
        'copyfree_check_verdicts_total{verdict="VERDICT_REGISTERED"}',
        'copyfree_audit_writes_total{outcome="written"}',
    ):
        assert needle in text, needle
