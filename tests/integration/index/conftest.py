"""Fixtures for the index integration tests: a real redis-server and real gRPC shard
servers on 127.0.0.1:0."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from copyfree.serving.server import RunningServer, start_server
from copyfree.v1 import index_pb2_grpc
from copyfree_index.embedded_redis import RedisProcess, redis_executable, start_redis
from copyfree_index.servicer import IndexServicer, as_service
from copyfree_index.settings import IndexSettings
from copyfree_index.shard import ShardIndex
from copyfree_index.store import RedisShardStore, ShardStore


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisProcess]:
    try:
        redis_executable()
    except FileNotFoundError as e:
        pytest.skip(f"no redis-server binary: {e}")
    proc = start_redis(tmp_path / "redis")
    yield proc
    proc.stop()


@dataclass
class ShardServer:
    running: RunningServer
    servicer: IndexServicer
    channel: grpc.aio.Channel
    stub: index_pb2_grpc.IndexServiceStub

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.running.port}"

    async def close(self) -> None:
        await self.channel.close()
        await self.running.server.stop(None)


StartShard = Callable[..., Awaitable[ShardServer]]


@pytest.fixture
async def start_shard(redis_server: RedisProcess) -> AsyncIterator[StartShard]:
    """start_shard(store=None, shard_id=0, num_shards=1, load=True) -> ShardServer.
    The default store is a fresh RedisShardStore on the test's redis-server, so a
    second call is a restart of the same shard from the same Redis."""
    started: list[ShardServer] = []
    stores: list[ShardStore] = []

    async def start(
        store: ShardStore | None = None,
        *,
        shard_id: int = 0,
        num_shards: int = 1,
        load: bool = True,
    ) -> ShardServer:
        if store is None:
            store = RedisShardStore.from_url(redis_server.url, shard_id=shard_id)
            stores.append(store)
        settings = IndexSettings(
            host="127.0.0.1", port=0, shard_id=shard_id, num_shards=num_shards
        )
        servicer = IndexServicer(ShardIndex(), store, settings)
        running = await start_server(settings, [as_service(servicer)])
        if load:
            await servicer.load()
            await running.mark_serving()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
        server = ShardServer(
            running, servicer, channel, index_pb2_grpc.IndexServiceStub(channel)
        )
        started.append(server)
        return server

    yield start
    for server in started:
        await server.close()
    for store in stores:
        store.close()
