"""Entry point: `python -m copyfree_gateway`."""

from __future__ import annotations

import asyncio
import logging

from copyfree.serving.logging import configure_logging
from copyfree.serving.metrics import start_metrics_server
from copyfree.serving.server import RunningServer, start_server
from copyfree_gateway.clients import EncoderClient, IndexClient
from copyfree_gateway.servicer import GatewayServicer, as_service
from copyfree_gateway.settings import GatewaySettings

log = logging.getLogger(__name__)


async def start(settings: GatewaySettings) -> tuple[RunningServer, GatewayServicer]:
    """Start the gateway (SERVING at once: it holds no state; downstream readiness shows
    as UNAVAILABLE on calls)."""
    encoder = EncoderClient(
        settings.encoder_addr, settings.call_timeout_s, settings.max_message_bytes
    )
    shards = [
        IndexClient(i, addr, settings.call_timeout_s, settings.max_message_bytes)
        for i, addr in enumerate(settings.index_addrs)
    ]
    servicer = GatewayServicer(settings, encoder, shards)
    running = await start_server(settings, [as_service(servicer)])
    await running.mark_serving()
    log.info(
        "gateway on port %d: encoder %s, %d index shards",
        running.port, settings.encoder_addr, len(shards),
    )  # fmt: skip
    return running, servicer


async def serve(settings: GatewaySettings) -> None:
    running, _ = await start(settings)
    await running.wait_for_signal()


def main() -> None:
    settings = GatewaySettings()
    configure_logging(settings.log_level, service="gateway")
    start_metrics_server(settings.metrics_port)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
