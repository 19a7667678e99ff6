"""Entry point: `python -m copyfree_gateway`."""

from __future__ import annotations

import asyncio
import logging

from copyfree.serving.logging import configure_logging
from copyfree.serving.metrics import start_metrics_server
from copyfree.serving.server import RunningServer, start_server
from copyfree.serving.tls import channel_credentials
from copyfree_gateway.audit import AuditedGatewayServicer, RedisAuditLog
from copyfree_gateway.clients import EncoderClient, IndexClient, Upstream
from copyfree_gateway.servicer import as_service
from copyfree_gateway.settings import GatewaySettings

log = logging.getLogger(__name__)


def upstream_of(settings: GatewaySettings) -> Upstream:
    """Deadline, message limit, token and TLS for every outbound call."""
    credentials = None
    if settings.upstream_ca_file is not None:
        credentials = channel_credentials(
            settings.upstream_ca_file,
            settings.upstream_cert_file,
            settings.upstream_key_file,
        )
    return Upstream(
        timeout_s=settings.call_timeout_s,
        max_message_bytes=settings.max_message_bytes,
        token=settings.upstream_bearer(),
        credentials=credentials,
        server_name=settings.upstream_server_name,
    )


async def open_audit(settings: GatewaySettings) -> RedisAuditLog | None:
    if not settings.redis_url:
        log.info("audit log off (GATEWAY_REDIS_URL is empty)")
        return None
    audit = RedisAuditLog.from_url(
        settings.redis_url, settings.audit_key, settings.audit_max_entries
    )
    try:
        await audit.ping()
    except Exception as e:  # keep starting: Check reports it (fail-closed by default)
        log.warning("audit Redis not reachable yet: %s", e)
    return audit


async def start(
    settings: GatewaySettings,
) -> tuple[RunningServer, AuditedGatewayServicer]:
    """Start the gateway (SERVING at once: it holds no state; downstream readiness shows
    as UNAVAILABLE on calls)."""
    upstream = upstream_of(settings)
    encoder = EncoderClient(settings.encoder_addr, upstream)
    shards = [
        IndexClient(i, addr, upstream) for i, addr in enumerate(settings.index_addrs)
    ]
    servicer = AuditedGatewayServicer(
        settings,
        encoder,
        shards,
        audit=await open_audit(settings),
        fail_open=settings.audit_fail_open,
    )
    running = await start_server(settings, [as_service(servicer)])
    await running.mark_serving()
    log.info(
        "gateway on port %d: encoder %s, %d index shards, tls %s, auth %s, audit %s",
        running.port, settings.encoder_addr, len(shards),
        "on" if settings.tls_enabled else "off",
        "on" if settings.auth_enabled else "off",
        "on" if settings.redis_url else "off",
    )  # fmt: skip
    return running, servicer


async def serve(settings: GatewaySettings) -> None:
    running, servicer = await start(settings)
    try:
        await running.wait_for_signal()
    finally:
        await servicer.close()


def main() -> None:
    settings = GatewaySettings()
    configure_logging(settings.log_level, service="gateway")
    start_metrics_server(settings.metrics_port)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
