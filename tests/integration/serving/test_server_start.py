"""Starting a gRPC server: a port already taken fails the start loudly."""

from __future__ import annotations

import pytest

from copyfree.serving.server import start_server
from copyfree.serving.settings import ServiceSettings


async def test_a_second_server_on_a_busy_port_fails_to_start() -> None:
    """gRPC's default SO_REUSEPORT would let the second copy bind too and quietly
    take half of the connections; copyfree turns it off."""
    first = await start_server(ServiceSettings(host="127.0.0.1", port=0), [])
    try:
        busy = ServiceSettings(host="127.0.0.1", port=first.port)
        with pytest.raises(
            RuntimeError, match=f"could not bind 127.0.0.1:{first.port}"
        ):
            await start_server(busy, [])
    finally:
        await first.stop()
    # Once the first one is gone the port is free again.
    again = await start_server(ServiceSettings(host="127.0.0.1", port=first.port), [])
    await again.stop()


async def test_a_busy_health_port_fails_the_start() -> None:
    first = await start_server(ServiceSettings(host="127.0.0.1", port=0), [])
    try:
        busy = ServiceSettings(host="127.0.0.1", port=0, health_port=first.port)
        with pytest.raises(
            RuntimeError, match=f"could not bind health 127.0.0.1:{first.port}: in use"
        ):
            await start_server(busy, [])
    finally:
        await first.stop()
