"""Start a grpc.aio server with health checking and reflection; stop it gracefully.

Every business service starts NOT_SERVING and is flipped to SERVING by its main once
it is ready (model loaded, shard loaded from Redis); the overall "" status is
SERVING as soon as the process answers, so liveness and readiness probe different names.
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

from copyfree.serving.interceptors import ObservabilityInterceptor
from copyfree.serving.settings import ServiceSettings


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


class RunningServer:
    def __init__(
        self,
        server: grpc.aio.Server,
        port: int,
        health_servicer: health.aio.HealthServicer,
        names: Sequence[str],
        grace_s: float,
    ) -> None:
        self.server, self.port = server, port
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


async def start_server(
    settings: ServiceSettings, services: Sequence[Service]
) -> RunningServer:
    server = grpc.aio.server(
        interceptors=[ObservabilityInterceptor()],
        options=channel_options(settings.max_message_bytes),
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
    port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    if port == 0:
        raise RuntimeError(f"could not bind {settings.host}:{settings.port}")
    await server.start()
    return RunningServer(
        server, port, health_servicer, names, settings.shutdown_grace_s
    )


async def wait_until_serving(
    address: str, service: str, *, timeout_s: float = 60.0
) -> None:
    """Poll a server's health until `service` is SERVING (for clients and tests)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    async with grpc.aio.insecure_channel(address) as channel:
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
