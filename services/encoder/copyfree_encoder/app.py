"""One encoder process: gRPC server (health, reflection) + model bundles, in-process.

start() binds the port with EncoderService NOT_SERVING; load() loads the bundles in a
thread, attaches them and flips it to SERVING. serve() is what `python -m
copyfree_encoder` runs; tests and the e2e harness use EncoderApp directly.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from copyfree.serving.metrics import start_metrics_server
from copyfree.serving.server import RunningServer, start_server
from copyfree_encoder.model import Encoder
from copyfree_encoder.servicer import ENCODER_SERVICE_NAME, EncoderServicer, as_service
from copyfree_encoder.settings import EncoderSettings

log = logging.getLogger(__name__)


class EncoderApp:
    def __init__(
        self,
        settings: EncoderSettings,
        running: RunningServer,
        servicer: EncoderServicer,
    ) -> None:
        self.settings, self.running, self.servicer = settings, running, servicer
        self._stopped = False

    @classmethod
    async def start(cls, settings: EncoderSettings) -> EncoderApp:
        """Bind and start the server; EncoderService is NOT_SERVING until load()."""
        servicer = EncoderServicer(settings)
        running = await start_server(settings, [as_service(servicer)])
        log.info(
            "Encoder listening on %s:%d (loading models)", settings.host, running.port
        )
        return cls(settings, running, servicer)

    @property
    def port(self) -> int:
        return self.running.port

    @property
    def address(self) -> str:
        """host:port for clients on this machine."""
        host = self.settings.host
        if host in ("[::]", "0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return f"{host}:{self.port}"

    @property
    def encoder(self) -> Encoder | None:
        return self.servicer.encoder

    async def load(self) -> Encoder:
        """Load the bundles in a thread (the server keeps answering), then SERVING.

        Raises BundleError when a bundle cannot be served."""
        encoder = await asyncio.to_thread(Encoder.load, self.settings)
        self.servicer.attach(encoder)
        await self.running.mark_serving()
        log.info("Encoder serving %s", ", ".join(map(repr, encoder.models)))
        return encoder

    def request_stop(self) -> None:
        """Make serve()/wait_for_signal() return as SIGTERM would."""
        self.running.request_stop()

    async def stop(self) -> None:
        """NOT_SERVING, drain in-flight calls (shutdown_grace_s), stop the batcher."""
        if self._stopped:
            return
        self._stopped = True
        await self.running.stop()
        await self.servicer.aclose()


async def serve(
    settings: EncoderSettings,
    ready: asyncio.Event | None = None,
    *,
    on_ready: Callable[[EncoderApp], object] | None = None,
) -> None:
    """Run the encoder until SIGTERM/SIGINT, request_stop() or cancellation.

    `ready` is set (and `on_ready(app)` called, e.g. to learn an ephemeral port) once
    the models are loaded and EncoderService is SERVING."""
    start_metrics_server(settings.metrics_port)
    app = await EncoderApp.start(settings)
    try:
        await app.load()
        if on_ready is not None:
            on_ready(app)
        if ready is not None:
            ready.set()
        await app.running.wait_for_signal()  # -> NOT_SERVING -> server.stop(grace)
    finally:
        await app.stop()
    log.info("Encoder stopped")


__all__ = ["ENCODER_SERVICE_NAME", "EncoderApp", "serve"]
