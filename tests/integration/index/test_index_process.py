"""The shard as a process: `python -m copyfree_index` killed with SIGKILL keeps every
acknowledged item; `serve()` with an embedded Redis keeps data across restarts."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from index_helpers import CVAE, REGISTRY, random_keys, registry_item

from copyfree.serving.server import RunningServer, wait_until_serving
from copyfree.v1 import index_pb2, index_pb2_grpc
from copyfree_index import INDEX_SERVICE_NAME
from copyfree_index.__main__ import serve
from copyfree_index.embedded_redis import RedisProcess
from copyfree_index.settings import IndexSettings

pytestmark = pytest.mark.redis


class ShardProcess:
    """`python -m copyfree_index`, JSON logs in a file; learns its port from them."""

    def __init__(self, redis_url: str, log_path: Path) -> None:
        env = {
            **os.environ,
            "INDEX_HOST": "127.0.0.1",
            "INDEX_PORT": "0",
            "INDEX_SHARD_ID": "0",
            "INDEX_NUM_SHARDS": "1",
            "INDEX_REDIS_URL": redis_url,
            "INDEX_REDIS_WAIT_S": "10",
        }
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "copyfree_index"],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def port(self, timeout_s: float = 30.0) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.log_path.read_text().splitlines():
                try:
                    message = json.loads(line)["message"]
                except (ValueError, KeyError):
                    continue
                if "listening on port" in message:
                    return int(message.split("listening on port ")[1].split()[0])
            assert self.process.poll() is None, self.log_path.read_text()
            time.sleep(0.05)
        raise TimeoutError(self.log_path.read_text())

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        self._log.close()

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(20)
        self._log.close()
        return code


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


async def test_sigkill_loses_no_acknowledged_item(
    redis_server: RedisProcess,
    processes: list[ShardProcess],
    tmp_path: Path,
    rng: np.random.Generator,
) -> None:
    first = ShardProcess(redis_server.url, tmp_path / "shard-1.log")
    processes.append(first)
    channel, stub = await _serving_stub(first)
    # phase 1, all acknowledged: 10 batches of 40, then 3 batches replacing ids again
    latest: dict[str, str] = {}  # id -> title of its last acknowledged version
    for b in range(10):
        ids = [f"w{b}-{i}" for i in range(40)]
        await stub.Upsert(
            _upsert([registry_item(i, random_keys(rng), "v1") for i in ids]), timeout=10
        )
        latest.update(dict.fromkeys(ids, "v1"))
    for b in range(3):
        ids = [f"w{b}-{i}" for i in range(0, 40, 2)]
        reply = await stub.Upsert(
            _upsert([registry_item(i, random_keys(rng), "v2") for i in ids]), timeout=10
        )
        assert reply.replaced == 20
        latest.update(dict.fromkeys(ids, "v2"))

    # phase 2: 30 concurrent upserts of new ids; SIGKILL once some are acknowledged
    acked: set[str] = set()
    attempted: set[str] = set()

    async def one(b: int) -> None:
        ids = [f"x{b}-{i}" for i in range(20)]
        attempted.update(ids)
        await stub.Upsert(
            _upsert([registry_item(i, random_keys(rng), "x") for i in ids]), timeout=10
        )
        acked.update(ids)

    tasks = [asyncio.create_task(one(b)) for b in range(30)]
    deadline = time.monotonic() + 10
    while len(acked) < 60 and time.monotonic() < deadline:
        await asyncio.sleep(0.001)
    first.kill()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    await channel.close()
    assert len(acked) >= 60
    assert all(r is None or isinstance(r, grpc.aio.AioRpcError) for r in results)

    second = ShardProcess(redis_server.url, tmp_path / "shard-2.log")
    processes.append(second)
    channel, stub = await _serving_stub(second)
    everything = index_pb2.DetectRequest(
        collection="kolaa",
        model=CVAE,
        query=random_keys(rng),
        max_hamming=64,
        max_candidates=10_000,
    )
    reply = await stub.Detect(everything, timeout=10)
    stats = await stub.Stats(index_pb2.StatsRequest(), timeout=10)
    await channel.close()
    assert second.terminate() == 0  # SIGTERM: graceful stop, exit code 0

    found = [c.id for c in reply.candidates]
    assert (
        len(found)
        == len(set(found))
        == reply.stage1_count
        == stats.collections[0].items
    )
    titles = {c.id: c.metadata.title for c in reply.candidates}
    for item_id, title in latest.items():  # every acknowledged item, its last version
        assert titles.get(item_id) == title, item_id
    assert acked <= set(found) <= set(latest) | attempted


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
    assert (tmp_path / "redis" / "appendonly.aof").exists()
