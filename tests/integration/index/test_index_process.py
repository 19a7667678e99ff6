"""The shard as a process, with a real redis-server: SIGKILL of the shard in the middle
of a 20,000-item ingest and SIGKILL of Redis itself (AOF on) lose no acknowledged
item; a shard started before Redis waits and becomes ready; `serve()` with an embedded
Redis keeps data across restarts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from index_helpers import (
    CVAE,
    REGISTRY,
    ShardProcess,
    random_keys,
    registry_item,
    restart_redis,
)

from copyfree.serving.server import RunningServer, wait_until_serving
from copyfree.v1 import index_pb2, index_pb2_grpc
from copyfree_index import INDEX_SERVICE_NAME
from copyfree_index.__main__ import serve
from copyfree_index.embedded_redis import RedisProcess, free_port, start_redis
from copyfree_index.ragged import Metadata
from copyfree_index.settings import IndexSettings
from copyfree_index.shard import ShardIndex
from copyfree_index.store import RedisShardStore

pytestmark = pytest.mark.redis


@pytest.fixture
def processes() -> Iterator[list[ShardProcess]]:
    started: list[ShardProcess] = []
    yield started
    for p in started:
        if p.process.poll() is None:
            p.kill()


async def _serving_stub(
    proc: ShardProcess,
) -> tuple[grpc.aio.Channel, index_pb2_grpc.IndexServiceStub]:
    port = await asyncio.to_thread(proc.port)
    await wait_until_serving(f"127.0.0.1:{port}", INDEX_SERVICE_NAME, timeout_s=30)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return channel, index_pb2_grpc.IndexServiceStub(channel)


def _upsert(items: list[index_pb2.IndexItem]) -> index_pb2.UpsertRequest:
    return index_pb2.UpsertRequest(
        collection="kolaa", kind=REGISTRY, model=CVAE, items=items
    )


def _stored(redis_url: str) -> ShardIndex:
    """What a fresh shard would load from Redis (read in-process)."""
    store = RedisShardStore.from_url(redis_url, 0)
    shard = ShardIndex()
    store.load(shard)
    store.close()
    return shard


def _batches(prefix: str, n: int, size: int, rng: np.random.Generator, title: str):
    return [
        [
            registry_item(f"{prefix}{b}-{i}", random_keys(rng), title)
            for i in range(size)
        ]
        for b in range(n)
    ]


async def test_sigkill_mid_ingest_of_20000_items_loses_no_acknowledged_item(
    redis_server: RedisProcess,
    processes: list[ShardProcess],
    tmp_path: Path,
    rng: np.random.Generator,
) -> None:
    first = ShardProcess(redis_server.url, tmp_path / "shard-1.log")
    processes.append(first)
    channel, stub = await _serving_stub(first)
    # phase 1, all acknowledged: 400 items, then 60 of them replaced (title v2)
    latest: dict[str, str] = {}  # id -> title of its last acknowledged version
    for batch in _batches("w", 4, 100, rng, "v1"):
        await stub.Upsert(_upsert(batch), timeout=10)
        latest.update((it.id, "v1") for it in batch)
    replace = [
        registry_item(f"w{b}-{i}", random_keys(rng), "v2")
        for b in range(3)
        for i in range(20)
    ]
    assert (await stub.Upsert(_upsert(replace), timeout=10)).replaced == 60
    latest.update((it.id, "v2") for it in replace)

    # phase 2: a 20,000-item ingest (40 Upserts of 500, 4 in flight); SIGKILL the
    # shard once 5,000 are acknowledged
    batches = _batches("x", 40, 500, rng, "x")
    acked: set[str] = set()
    queue = list(batches)

    async def sender() -> None:
        while queue:
            batch = queue.pop()
            await stub.Upsert(_upsert(batch), timeout=20)
            acked.update(it.id for it in batch)

    tasks = [asyncio.create_task(sender()) for _ in range(4)]
    deadline = time.monotonic() + 60
    while len(acked) < 5_000 and time.monotonic() < deadline:
        await asyncio.sleep(0.001)
    first.kill()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    await channel.close()
    assert 5_000 <= len(acked) < 20_000, len(acked)
    assert any(isinstance(r, grpc.aio.AioRpcError) for r in results)

    second = ShardProcess(redis_server.url, tmp_path / "shard-2.log")
    processes.append(second)
    channel, stub = await _serving_stub(second)
    stats = await stub.Stats(index_pb2.StatsRequest(), timeout=10)
    # an acknowledged item, looked up by its exact key through the new process
    probe = next(it for batch in batches for it in batch if it.id in acked)
    reply = await stub.Detect(
        index_pb2.DetectRequest(
            collection="kolaa", model=CVAE, query=probe.keys, max_hamming=0
        ),
        timeout=10,
    )
    await channel.close()
    assert second.terminate() == 0  # SIGTERM: graceful stop, exit code 0
    assert probe.id in [c.id for c in reply.candidates]

    stored = _stored(redis_server.url)
    attempted = {it.id for batch in batches for it in batch}
    (coll_stats,) = stored.stats()
    live = stored.present("kolaa", sorted(set(latest) | attempted))
    assert len(live) == len(set(live)) == coll_stats.items == stats.collections[0].items
    assert acked | set(latest) <= set(live) <= set(latest) | attempted
    # every acknowledged version: the replaced items carry their last title
    snap = stored.snapshot("kolaa")
    titles = {
        snap.records[r]: snap.records.metadata(r)
        for r in range(snap.view.rows)
        if snap.alive[r]
    }
    for item_id, title in latest.items():
        assert Metadata.decode(titles[item_id]).title == title, item_id


async def test_redis_killed_and_restarted_with_aof_loses_no_acknowledged_item(
    redis_server: RedisProcess,
    processes: list[ShardProcess],
    tmp_path: Path,
    rng: np.random.Generator,
) -> None:
    """SIGKILL Redis itself (appendfsync everysec: acknowledged writes were written to
    the AOF before the reply, so they survive a Redis crash) while the shard ingests;
    writes fail UNAVAILABLE while it is down and succeed again after it restarts."""
    shard = ShardProcess(redis_server.url, tmp_path / "shard.log")
    processes.append(shard)
    channel, stub = await _serving_stub(shard)
    batches = _batches("r", 60, 200, rng, "t")
    acked: set[str] = set()
    failed = 0
    redis_proc = redis_server
    for i, batch in enumerate(batches):
        if i == 20:
            redis_proc.kill()  # no save, no fsync: a crash
        if i == 30:
            redis_proc = restart_redis(redis_proc)
        for _ in range(5 if i >= 30 else 1):  # after the restart, retry as clients do
            try:
                await stub.Upsert(_upsert(batch), timeout=20)
                acked.update(it.id for it in batch)
                break
            except grpc.aio.AioRpcError as e:
                assert e.code() == grpc.StatusCode.UNAVAILABLE, e
                failed += 1
                await asyncio.sleep(0.2)
    await channel.close()
    assert shard.terminate() == 0
    assert failed >= 10  # every write while Redis was down was refused
    before_and_after = batches[:20] + batches[30:]
    assert {it.id for batch in before_and_after for it in batch} <= acked
    stored = _stored(redis_proc.url)
    attempted = {it.id for batch in batches for it in batch}
    live = set(stored.present("kolaa", sorted(attempted)))
    assert acked <= live
    redis_proc.stop()


async def test_shard_started_while_redis_is_down_becomes_ready_when_it_is_up(
    processes: list[ShardProcess], tmp_path: Path, rng: np.random.Generator
) -> None:
    port = free_port()
    shard = ShardProcess(
        f"redis://127.0.0.1:{port}/0", tmp_path / "shard.log", INDEX_REDIS_WAIT_S="60"
    )
    processes.append(shard)
    grpc_port = await asyncio.to_thread(shard.port)
    address = f"127.0.0.1:{grpc_port}"
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        await asyncio.sleep(1.0)  # it keeps retrying Redis meanwhile
        status = await health.Check(
            health_pb2.HealthCheckRequest(service=INDEX_SERVICE_NAME), timeout=5
        )
        assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
        live = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert live.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await index_pb2_grpc.IndexServiceStub(channel).Upsert(
                _upsert(_batches("d", 1, 3, rng, "t")[0]), timeout=5
            )
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        redis_proc = await asyncio.to_thread(start_redis, tmp_path / "redis", port)
        try:
            await wait_until_serving(address, INDEX_SERVICE_NAME, timeout_s=30)
            reply = await index_pb2_grpc.IndexServiceStub(channel).Upsert(
                _upsert(_batches("d", 1, 3, rng, "t")[0]), timeout=5
            )
            assert reply.upserted == 3
        finally:
            assert shard.terminate() == 0
            redis_proc.stop()
    assert any("not reachable yet" in m for m in shard.messages())


async def test_serve_with_embedded_redis_keeps_data_across_restarts(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    settings = IndexSettings(host="127.0.0.1", port=0, data_dir=tmp_path / "redis")
    keys = random_keys(rng)

    async def run_once(action) -> object:
        started: asyncio.Future[RunningServer] = (
            asyncio.get_running_loop().create_future()
        )
        task = asyncio.create_task(serve(settings, started=started))
        running = await started
        await wait_until_serving(
            f"127.0.0.1:{running.port}", INDEX_SERVICE_NAME, timeout_s=20
        )
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            result = await action(index_pb2_grpc.IndexServiceStub(channel))
        running.request_stop()
        await asyncio.wait_for(task, 20)
        return result

    async def write(stub: index_pb2_grpc.IndexServiceStub) -> object:
        return await stub.Upsert(_upsert([registry_item("only", keys)]), timeout=10)

    async def read(stub: index_pb2_grpc.IndexServiceStub) -> object:
        request = index_pb2.DetectRequest(
            collection="kolaa", model=CVAE, query=keys, max_hamming=0
        )
        return await stub.Detect(request, timeout=10)

    assert (await run_once(write)).upserted == 1
    reply = await run_once(read)
    assert [c.id for c in reply.candidates] == ["only"]
    # Redis 6 writes appendonly.aof; Redis >= 7 a multi-part AOF in appendonlydir/
    redis_dir = tmp_path / "redis"
    assert (redis_dir / "appendonly.aof").exists() or any(
        (redis_dir / "appendonlydir").glob("*.incr.aof")
    )
