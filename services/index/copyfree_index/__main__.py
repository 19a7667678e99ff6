"""Entry point: `python -m copyfree_index` serves one index shard.

settings -> logging -> (embedded Redis when INDEX_REDIS_URL is empty) -> gRPC server
(health NOT_SERVING) -> wait for Redis -> replay the shard from Redis -> SERVING ->
wait for SIGTERM/SIGINT -> graceful stop.
"""

from __future__ import annotations

import asyncio
import logging

from copyfree.serving.logging import configure_logging
from copyfree.serving.metrics import start_metrics_server
from copyfree.serving.server import RunningServer, start_server
from copyfree_index import INDEX_SERVICE_NAME
from copyfree_index.embedded_redis import RedisProcess, start_redis
from copyfree_index.servicer import IndexServicer, as_service
from copyfree_index.settings import IndexSettings
from copyfree_index.shard import ShardIndex
from copyfree_index.store import RedisShardStore, wait_for_store

__all__ = ["INDEX_SERVICE_NAME", "main", "serve"]

log = logging.getLogger("copyfree_index")


async def serve(
    settings: IndexSettings, *, started: asyncio.Future[RunningServer] | None = None
) -> None:
    """Run one shard until SIGTERM/SIGINT (or `RunningServer.request_stop()`).

    `started`, if given, receives the RunningServer as soon as the port is bound
    (before loading), so an embedding process (CLI, tests) can learn the port."""
    start_metrics_server(settings.metrics_port)
    embedded: RedisProcess | None = None
    url = settings.redis_url
    if not url:
        # In this (main) thread: the child gets SIGTERM if this process dies.
        embedded = start_redis(
            settings.data_dir,
            appendfsync=settings.redis_appendfsync,
            stop_with_parent=True,
        )
        url = embedded.url
    cluster = {"auto": None, "yes": True, "no": False}[settings.redis_cluster]
    store = RedisShardStore.from_url(
        url,
        shard_id=settings.shard_id,
        cluster=cluster,
        num_shards=settings.num_shards,
    )
    servicer = IndexServicer(ShardIndex(), store, settings)
    running: RunningServer | None = None
    try:
        running = await start_server(settings, [as_service(servicer)])
        log.info(
            "index shard %d/%d listening on port %d (not serving until loaded)",
            settings.shard_id,
            settings.num_shards,
            running.port,
        )
        if started is not None and not started.done():
            started.set_result(running)
        await wait_for_store(
            store, settings.redis_wait_s, what=f"redis at {_safe(url)}"
        )
        durability = await asyncio.to_thread(store.durability)
        log.info("redis durability: %s", durability)
        if durability.get("appendonly") == "no":
            log.warning(
                "redis has AOF off: acknowledged writes since the last RDB save are "
                "lost if Redis crashes (set appendonly yes)"
            )
        await servicer.load(freeze_gc=True)
        await running.mark_serving()
        log.info("index shard %d serving", settings.shard_id)
        await running.wait_for_signal()  # stops the server gracefully
        running = None
    finally:
        if running is not None:  # failed before serving: stop without waiting
            await running.stop()
        store.close()
        if embedded is not None:
            embedded.stop()
        if started is not None and not started.done():
            started.cancel()
        log.info("index shard %d stopped", settings.shard_id)


def _safe(url: str) -> str:
    """The URL without a password, for logs."""
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.rpartition('@')[2]}"
    return url


def main() -> None:
    settings = IndexSettings()  # env -> validated, frozen; bad config fails here
    configure_logging(settings.log_level, service="index")
    try:
        asyncio.run(serve(settings))
    except KeyboardInterrupt:
        pass
    except Exception:
        log.exception("index shard %d failed", settings.shard_id)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
