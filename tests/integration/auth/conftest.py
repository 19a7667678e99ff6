"""A secured stack in this process: encoder (tiny bundles), one index shard on a real
redis-server, and the gateway, every one with TLS (certificates made by openssl for
this run), bearer tokens and limits, the gateway calling the others with its own token
and client certificate, and auditing every Check into the same Redis."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from copyfree.serving.server import RunningServer, start_server
from copyfree.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from copyfree_encoder.app import EncoderApp
from copyfree_encoder.settings import EncoderSettings
from copyfree_gateway.__main__ import start as start_gateway
from copyfree_gateway.audit import AuditedGatewayServicer
from copyfree_gateway.settings import GatewaySettings
from copyfree_index.embedded_redis import RedisProcess
from copyfree_index.servicer import IndexServicer, as_service
from copyfree_index.settings import IndexSettings
from copyfree_index.shard import ShardIndex
from copyfree_index.store import RedisShardStore
from tests.utils.images import make_image_bytes
from tests.utils.tiny_bundles import make_detection_bundle, make_retrieval_bundle

CHECKER = "checker-token-0123456789"
REGISTRAR = "registrar-token-0123456789"
ADMIN = "admin-token-0123456789"
GATEWAY = "gateway-token-0123456789"
ONE_AT_A_TIME = "one-at-a-time-token-0123"
SLOW_RATE = "slow-rate-token-01234567"
# Public clients of the gateway.
GATEWAY_TOKENS = {
    CHECKER: {"client": "teacher-portal", "scopes": ["check"]},
    REGISTRAR: {"client": "registry-ingest", "scopes": ["register"]},
    ADMIN: {"client": "ops", "scopes": ["admin"]},
    ONE_AT_A_TIME: {
        "client": "one-at-a-time",
        "scopes": ["check", "register"],
        "max_in_flight": 1,
    },
    # One call, then the bucket refills at 1 per ~17 minutes: the next is refused.
    SLOW_RATE: {"client": "slow-rate", "scopes": ["check"], "rate_per_s": 0.001},
}
# Encoder and index accept only the gateway.
INTERNAL_TOKENS = {
    GATEWAY: {"client": "gateway", "scopes": ["check", "register", "admin"]}
}
REGISTERED = 6
FREE = 6
MAX_MESSAGE_BYTES = 512 * 1024


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    d = tmp_path_factory.mktemp("tls")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/CN=copyfree-test-ca", cwd=d)  # fmt: skip
    (d / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name, subject in (("server", "/CN=localhost"), ("client", "/CN=gateway")):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", subject, cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey",
                 "ca.key", "-CAcreateserial", "-out", f"{name}.crt", "-days", "2",
                 "-extfile", f"{name}.ext", cwd=d)  # fmt: skip
    return Certs(
        d / "ca.crt", d / "server.crt", d / "server.key", d / "client.crt",
        d / "client.key",
    )  # fmt: skip


@dataclass
class SecureStack:
    certs: Certs
    redis: RedisProcess
    encoder: EncoderApp
    index: RunningServer
    gateway: RunningServer
    gateway_servicer: AuditedGatewayServicer
    gateway_settings: GatewaySettings
    images: dict[str, bytes] = field(default_factory=dict)
    _channels: list[grpc.aio.Channel] = field(default_factory=list)

    @property
    def gateway_addr(self) -> str:
        return f"127.0.0.1:{self.gateway.port}"

    @property
    def encoder_addr(self) -> str:
        return f"127.0.0.1:{self.encoder.port}"

    @property
    def index_addr(self) -> str:
        return f"127.0.0.1:{self.index.port}"

    def channel(self, address: str) -> grpc.aio.Channel:
        """A TLS channel that trusts the test CA (no client certificate)."""
        creds = grpc.ssl_channel_credentials(self.certs.ca.read_bytes())
        ch = grpc.aio.secure_channel(
            address,
            creds,
            options=[
                ("grpc.max_receive_message_length", 8 * MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", 8 * MAX_MESSAGE_BYTES),
            ],
        )
        self._channels.append(ch)
        return ch

    def gateway_stub(self) -> gateway_pb2_grpc.GatewayServiceStub:
        return gateway_pb2_grpc.GatewayServiceStub(self.channel(self.gateway_addr))

    async def close(self) -> None:
        for ch in self._channels:
            await ch.close()


def bearer(token: str, **extra: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"), *extra.items())


def tls_settings(certs: Certs, *, mutual: bool) -> dict[str, Any]:
    return {
        "host": "127.0.0.1",
        "port": 0,
        "tls_cert_file": certs.server_cert,
        "tls_key_file": certs.server_key,
        "tls_client_ca_file": certs.ca if mutual else None,
        "access_log": True,
        "shutdown_grace_s": 0.5,
    }


def gateway_settings(stack_parts: dict[str, Any], **overrides: Any) -> GatewaySettings:
    certs: Certs = stack_parts["certs"]
    values: dict[str, Any] = {
        **tls_settings(certs, mutual=False),
        "encoder_addr": stack_parts["encoder_addr"],
        "index_addrs": [stack_parts["index_addr"]],
        "auth_tokens": json.dumps(GATEWAY_TOKENS),
        "max_message_bytes": MAX_MESSAGE_BYTES,
        "call_timeout_s": 10.0,
        "redis_url": stack_parts["redis_url"],
        "upstream_token": GATEWAY,
        "upstream_ca_file": certs.ca,
        "upstream_cert_file": certs.client_cert,
        "upstream_key_file": certs.client_key,
        "upstream_server_name": "localhost",
    }
    values.update(overrides)
    return GatewaySettings(**values)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(
    certs: Certs,
    redis_server: RedisProcess,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[SecureStack]:
    root = tmp_path_factory.mktemp("bundles")
    internal = {
        **tls_settings(certs, mutual=True),  # only the gateway's certificate gets in
        "auth_tokens": json.dumps(INTERNAL_TOKENS),
    }
    encoder = await EncoderApp.start(
        EncoderSettings(
            **internal,
            detection_bundle=make_detection_bundle(root / "detection"),
            retrieval_bundle=make_retrieval_bundle(root / "retrieval", bits=16),
            providers="cpu",
            batch_wait_ms=1.0,
        )
    )
    await encoder.load()
    store = RedisShardStore.from_url(redis_server.url, shard_id=0)
    index_settings = IndexSettings(**internal, shard_id=0, num_shards=1)
    index_servicer = IndexServicer(ShardIndex(), store, index_settings)
    index = await start_server(index_settings, [as_service(index_servicer)])
    await index_servicer.load()
    await index.mark_serving()
    parts = {
        "certs": certs,
        "encoder_addr": f"127.0.0.1:{encoder.port}",
        "index_addr": f"127.0.0.1:{index.port}",
        "redis_url": redis_server.url,
    }
    settings = gateway_settings(parts)
    gateway, servicer = await start_gateway(settings)
    stack = SecureStack(
        certs, redis_server, encoder, index, gateway, servicer, settings
    )
    stack.images = {f"reg-{s}": make_image_bytes(s) for s in range(REGISTERED)}
    stack.images.update({f"free-{s}": make_image_bytes(100 + s) for s in range(FREE)})
    stack.images["unregistered"] = make_image_bytes(999)
    await _register(stack)
    yield stack
    await stack.close()
    await gateway.stop()
    await servicer.close()
    await index.stop()
    await encoder.stop()
    store.close()


async def _register(stack: SecureStack) -> None:
    stub = stack.gateway_stub()
    for prefix, collection, kind in (
        ("reg-", "registry", common_pb2.COLLECTION_KIND_REGISTRY),
        ("free-", "copyright-free", common_pb2.COLLECTION_KIND_COPYRIGHT_FREE),
    ):
        messages = [
            gateway_pb2.RegisterRequest(
                collection=collection, kind=kind, id=name, image=data
            )
            for name, data in stack.images.items()
            if name.startswith(prefix)
        ]
        reply = await stub.Register(
            iter(messages), timeout=30, metadata=bearer(REGISTRAR)
        )
        assert reply.registered == len(messages) and not reply.failures
