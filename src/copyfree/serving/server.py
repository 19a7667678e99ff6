"""Start a grpc.aio server with health checking and reflection; stop it gracefully.

Every business service starts NOT_SERVING and is flipped to SERVING by its main once
it is ready (model loaded, shard loaded from Redis); the overall "" status is
SERVING as soon as the process answers, so liveness and readiness probe different names.

Security and limits come from ServiceSettings: TLS on the main port when certificates
are configured, bearer tokens and per-client limits in the interceptor, and an optional
plaintext health-only port for kubelet probes (which cannot speak TLS).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from copyfree.serving.auth import TokenTable
from copyfree.serving.interceptors import ObservabilityInterceptor
from copyfree.serving.limits import ClientLimiter, Limits
from copyfree.serving.settings import ServiceSettings
from copyfree.serving.tls import server_credentials


@dataclass(frozen=True)
class Service:
    name: str  # full service name, e.g. "copyfree.v1.IndexService"
    add_to_server: Callable[[Any, grpc.aio.Server], None]
    servicer: Any


def channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


# gRPC servers bind with SO_REUSEPORT by default on Linux: a second copy of a service
# started on a busy port binds it too and silently takes half of the connections. A
# busy port must fail the start instead.
_EXCLUSIVE_PORT = ("grpc.so_reuseport", 0)


class RunningServer:
    def __init__(
        self,
        server: grpc.aio.Server,
        port: int,
        health_servicer: health.aio.HealthServicer,
        names: Sequence[str],
        grace_s: float,
        health_server: grpc.aio.Server | None = None,
        health_port: int = 0,
    ) -> None:
        self.server, self.port = server, port
        self.health_server, self.health_port = health_server, health_port
        self._health, self._names, self._grace_s = health_servicer, list(names), grace_s
        self._stop = asyncio.Event()

    async def mark_serving(self) -> None:
        for name in self._names:
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def mark_not_serving(self) -> None:
        for name in self._names:
            await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    def request_stop(self) -> None:
        self._stop.set()

    async def wait_for_signal(self) -> None:
        """Block until SIGTERM/SIGINT (or request_stop), then stop gracefully."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self._stop.set)
            except (NotImplementedError, RuntimeError):
                pass  # not the main thread (tests): request_stop() is the way
        await self._stop.wait()
        await self.stop()

    async def stop(self) -> None:
        await self._health.enter_graceful_shutdown()
        await self.server.stop(self._grace_s)
        if self.health_server is not None:
            await self.health_server.stop(None)


def make_interceptor(settings: ServiceSettings) -> ObservabilityInterceptor:
    """The interceptor for these settings (reads the token file: fails at start, not
    on the first call, when it is missing or malformed)."""
    tokens = TokenTable.from_sources(
        settings.auth_tokens_file,
        settings.auth_tokens.get_secret_value() if settings.auth_tokens else None,
    )
    default = Limits(
        settings.client_max_in_flight, settings.client_rate_per_s, settings.client_burst
    )
    # Per-token limits need the limiter even when the service default is unlimited.
    limiter = ClientLimiter(default) if default.active or tokens is not None else None
    return ObservabilityInterceptor(
        tokens=tokens, limiter=limiter, access_log=settings.access_log
    )


def _bind(
    server: grpc.aio.Server,
    address: str,
    creds: grpc.ServerCredentials | None,
    what: str = "",
) -> int:
    """Add the listening port; a port that cannot be bound fails with its name."""
    try:
        if creds is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, creds)
    except RuntimeError as e:  # grpc raises this when bind() fails
        raise RuntimeError(
            f"could not bind {what}{address}: in use by another process, or not "
            "permitted"
        ) from e
    if port == 0:
        raise RuntimeError(f"could not bind {what}{address}")
    return port


async def start_server(
    settings: ServiceSettings, services: Sequence[Service]
) -> RunningServer:
    server = grpc.aio.server(
        interceptors=[make_interceptor(settings)],
        options=[*channel_options(settings.max_message_bytes), _EXCLUSIVE_PORT],
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs or None,
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for s in services:
        s.add_to_server(s.servicer, server)
        await health_servicer.set(s.name, health_pb2.HealthCheckResponse.NOT_SERVING)
    names = [s.name for s in services]
    reflection.enable_server_reflection(
        [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    port = _bind(
        server, f"{settings.host}:{settings.port}", server_credentials(settings)
    )
    health_server, health_port = None, 0
    if settings.health_port:
        # Health only (same servicer, so both ports report the same status).
        health_server = grpc.aio.server(options=[_EXCLUSIVE_PORT])
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        health_port = _bind(
            health_server, f"{settings.host}:{settings.health_port}", None, "health "
        )
        await health_server.start()
    await server.start()
    return RunningServer(
        server,
        port,
        health_servicer,
        names,
        settings.shutdown_grace_s,
        health_server,
        health_port,
    )


async def wait_until_serving(
    address: str,
    service: str,
    *,
    timeout_s: float = 60.0,
    credentials: grpc.ChannelCredentials | None = None,
) -> None:
    """Poll a server's health until `service` is SERVING (for clients and tests)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    channel = (
        grpc.aio.insecure_channel(address)
        if credentials is None
        else grpc.aio.secure_channel(address, credentials)
    )
    async with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = await stub.Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=2
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(
                    f"{service} at {address} not SERVING after {timeout_s}s"
                )
            await asyncio.sleep(0.1)
