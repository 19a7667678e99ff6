"""Re-sharding 2 -> 3 with `python -m copyfree_index.reshard` (counts and checksums
verified), and the same shard code on a local Redis Cluster (3 masters on loopback
ports), including a re-shard there."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
from index_helpers import (
    COPYRIGHT_FREE,
    CVAE,
    REGISTRY,
    TBH,
    cluster_binary,
    free_item,
    random_code,
    random_keys,
    redis_cluster,
    registry_item,
)

from copyfree import routing
from copyfree.errors import FailedPrecondition
from copyfree.serving.server import start_server
from copyfree.v1 import index_pb2, index_pb2_grpc
from copyfree_index.embedded_redis import RedisProcess
from copyfree_index.reshard import _SWITCH_SCRIPT, STAGED_SUFFIX, Resharder
from copyfree_index.servicer import IndexServicer, as_service
from copyfree_index.settings import IndexSettings
from copyfree_index.shard import ShardIndex
from copyfree_index.store import KEY_PREFIX, RedisShardStore, log_key, meta_key

pytestmark = pytest.mark.redis

Start = Callable[[str, int], Awaitable[index_pb2_grpc.IndexServiceStub]]


@pytest.fixture
async def cluster_of_shards() -> AsyncIterator[Start]:
    """start(redis_url, num_shards) -> stubs of num_shards loaded shard servers."""
    running, channels, stores = [], [], []

    async def start(url: str, num_shards: int) -> list[index_pb2_grpc.IndexServiceStub]:
        stubs = []
        for shard_id in range(num_shards):
            settings = IndexSettings(
                host="127.0.0.1", port=0, shard_id=shard_id, num_shards=num_shards
            )
            store = RedisShardStore.from_url(url, shard_id, num_shards=num_shards)
            stores.append(store)
            servicer = IndexServicer(ShardIndex(), store, settings)
            server = await start_server(settings, [as_service(servicer)])
            running.append(server)
            await servicer.load()
            await server.mark_serving()
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
            channels.append(channel)
            stubs.append(index_pb2_grpc.IndexServiceStub(channel))
        return stubs

    yield start  # type: ignore[misc]
    for channel in channels:
        await channel.close()
    for server in running:
        await server.server.stop(None)
    for store in stores:
        store.close()


async def fill(stubs, rng: np.random.Generator) -> tuple[dict, dict]:
    """2,000 registry works and 400 copyright-free images, routed to their shards;
    then 100 works deleted and 50 replaced. Returns the live keys and codes."""
    n = len(stubs)
    keys = {f"work-{i:05d}": random_keys(rng) for i in range(2000)}
    codes = {f"img-{i:04d}": random_code(rng, 32, 8) for i in range(400)}
    for shard, stub in enumerate(stubs):
        mine = [i for i in keys if routing.shard_for(i, n) == shard]
        await stub.Upsert(
            index_pb2.UpsertRequest(
                collection="kolaa",
                kind=REGISTRY,
                model=CVAE,
                items=[registry_item(i, keys[i]) for i in mine],
            ),
            timeout=20,
        )
        gone = mine[:50]
        await stub.Delete(index_pb2.DeleteRequest(collection="kolaa", ids=gone))
        for i in gone:
            del keys[i]
        again = mine[50:75]
        for i in again:
            keys[i] = random_keys(rng)
        await stub.Upsert(
            index_pb2.UpsertRequest(
                collection="kolaa",
                kind=REGISTRY,
                model=CVAE,
                items=[registry_item(i, keys[i]) for i in again],
            ),
            timeout=20,
        )
        await stub.Upsert(
            index_pb2.UpsertRequest(
                collection="free",
                kind=COPYRIGHT_FREE,
                model=TBH,
                items=[
                    free_item(i, c)
                    for i, c in codes.items()
                    if routing.shard_for(i, n) == shard
                ],
            ),
            timeout=20,
        )
    return keys, codes


def reshard(url: str, collection: str, old: int, new: int) -> dict:
    out = subprocess.run(
        [
            sys.executable, "-m", "copyfree_index.reshard", "--redis-url", url,
            "--collection", collection, "--from", str(old), "--to", str(new),
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


async def check_layout(stubs, keys: dict, codes: dict) -> None:
    """Every shard holds exactly the items that route to it, and finds them."""
    n = len(stubs)
    for shard, stub in enumerate(stubs):
        stats = await stub.Stats(index_pb2.StatsRequest(), timeout=10)
        counts = {c.name: c.items for c in stats.collections}
        assert counts == {
            "kolaa": sum(routing.shard_for(i, n) == shard for i in keys),
            "free": sum(routing.shard_for(i, n) == shard for i in codes),
        }
        mine = [i for i in keys if routing.shard_for(i, n) == shard][:25]
        for item_id in mine:
            reply = await stub.Detect(
                index_pb2.DetectRequest(
                    collection="kolaa", model=CVAE, query=keys[item_id], max_hamming=0
                ),
                timeout=10,
            )
            assert item_id in [c.id for c in reply.candidates]


async def test_reshard_2_to_3_moves_everything_and_verifies(
    redis_server: RedisProcess, cluster_of_shards: Start, rng: np.random.Generator
) -> None:
    two = await cluster_of_shards(redis_server.url, 2)
    keys, codes = await fill(two, rng)
    first = reshard(redis_server.url, "kolaa", 2, 3)
    assert first["items"] == len(keys) and sum(first["per_shard"]) == len(keys)
    assert reshard(redis_server.url, "free", 2, 3)["items"] == len(codes)
    three = await cluster_of_shards(redis_server.url, 3)
    await check_layout(three, keys, codes)
    # a shard still configured for 2 refuses to load the re-sharded collection
    stale = RedisShardStore.from_url(redis_server.url, 0, num_shards=2)
    with pytest.raises(FailedPrecondition, match="partitioned for 3 shards"):
        stale.load(ShardIndex())
    stale.close()
    # no staging keys or plan left behind; each shard's row count (the reload's
    # sizing hint) is its share
    client = redis_server.client()
    assert not [k for k in client.keys("*") if b"reshard" in k]
    rows = [
        int(client.hget(meta_key(KEY_PREFIX, "kolaa", s), "rows")) for s in range(3)
    ]
    assert rows == first["per_shard"]
    client.close()


@pytest.mark.skipif(cluster_binary() is None, reason="no redis-server >= 6 binary")
async def test_redis_cluster_runs_the_same_code_including_a_reshard(
    tmp_path: Path, cluster_of_shards: Start, rng: np.random.Generator
) -> None:
    with redis_cluster(tmp_path) as ports:
        url = f"redis://127.0.0.1:{ports[0]}/0"
        two = await cluster_of_shards(url, 2)
        keys, codes = await fill(two, rng)
        await check_layout(two, keys, codes)
        # the (collection, shard) hash tags spread over the masters
        holders = 0
        for port in ports:
            node = redis.Redis(port=port)
            holders += bool(node.dbsize())
            node.close()
        assert holders >= 2
        # restart from the cluster: the same answers
        request = index_pb2.SimilarRequest(
            collection="free", model=TBH, query=random_code(rng, 32, 8), top_n=20
        )
        before = await two[0].Similar(request, timeout=10)
        again = await cluster_of_shards(url, 2)
        after = await again[0].Similar(request, timeout=10)
        assert list(after.hits) == list(before.hits)
        assert len(after.hits) == 20
        await check_layout(again, keys, codes)
        assert reshard(url, "kolaa", 2, 3)["items"] == len(keys)
        assert reshard(url, "free", 2, 3)["items"] == len(codes)
        await check_layout(await cluster_of_shards(url, 3), keys, codes)


async def test_an_interrupted_reshard_is_finished_by_running_it_again(
    redis_server: RedisProcess, cluster_of_shards: Start, rng: np.random.Generator
) -> None:
    keys, codes = await fill(await cluster_of_shards(redis_server.url, 2), rng)
    client = redis_server.client()
    for name in ("kolaa", "free"):
        Resharder(client, name).stage(2, 3)  # staged and verified ...
    # ... and shard 0 of "kolaa" switched when the process died
    live_log, live_meta = (
        log_key(KEY_PREFIX, "kolaa", 0),
        meta_key(KEY_PREFIX, "kolaa", 0),
    )
    client.eval(
        _SWITCH_SCRIPT, 4, live_log + STAGED_SUFFIX, live_log,
        live_meta + STAGED_SUFFIX, live_meta,
    )  # fmt: skip
    client.close()
    assert reshard(redis_server.url, "kolaa", 2, 3)["items"] == len(keys)
    assert reshard(redis_server.url, "free", 2, 3)["items"] == len(codes)
    await check_layout(await cluster_of_shards(redis_server.url, 3), keys, codes)
