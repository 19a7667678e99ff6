"""IndexService through its real gRPC surface, with real Redis behind it."""

from __future__ import annotations

import asyncio
import threading

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from index_helpers import (
    COPYRIGHT_FREE,
    CVAE,
    REGISTRY,
    TBH,
    free_item,
    near_copy,
    random_code,
    random_keys,
    registry_item,
)

from copyfree import routing
from copyfree.v1 import common_pb2, index_pb2
from copyfree_index import INDEX_SERVICE_NAME
from copyfree_index.shard import ShardIndex
from copyfree_index.store import InMemoryShardStore, LoadReport

pytestmark = pytest.mark.redis


async def fill(stub, rng: np.random.Generator, n: int = 300):
    """n registry works and n copyright-free images; returns their keys/codes."""
    keys = {f"work-{i:03d}": random_keys(rng) for i in range(n)}
    codes = {f"img-{i:03d}": random_code(rng) for i in range(n)}
    ids = list(keys)
    for start in range(0, n, 100):
        reply = await stub.Upsert(
            index_pb2.UpsertRequest(
                collection="kolaa",
                kind=REGISTRY,
                model=CVAE,
                items=[registry_item(i, keys[i]) for i in ids[start : start + 100]],
            ),
            timeout=10,
        )
        assert (reply.upserted, reply.replaced) == (100, 0)
    await stub.Upsert(
        index_pb2.UpsertRequest(
            collection="free",
            kind=COPYRIGHT_FREE,
            model=TBH,
            items=[free_item(i, c) for i, c in codes.items()],
        ),
        timeout=10,
    )
    return keys, codes


def queries(keys, codes, rng: np.random.Generator):
    """A fixed mix of Detect (near copies, strangers) and Similar requests."""
    out: list[tuple[str, object]] = []
    for item_id in list(keys)[:20]:
        out.append(
            (
                "Detect",
                index_pb2.DetectRequest(
                    collection="kolaa",
                    model=CVAE,
                    query=near_copy(keys[item_id], int(rng.integers(0, 14)), rng),
                    max_hamming=12,
                    fallback_k=16,
                ),
            )
        )
    for _ in range(5):
        out.append(
            (
                "Detect",
                index_pb2.DetectRequest(
                    collection="kolaa",
                    model=CVAE,
                    query=random_keys(rng),
                    max_hamming=3,
                    fallback_k=8,
                ),
            )
        )
    for _ in range(10):
        out.append(
            (
                "Similar",
                index_pb2.SimilarRequest(
                    collection="free", model=TBH, query=random_code(rng), top_n=25
                ),
            )
        )
    return out


async def answers(stub, requests):
    return [await getattr(stub, method)(req, timeout=10) for method, req in requests]


async def test_upsert_then_detect_and_similar_find_the_items(start_shard, rng) -> None:
    shard = await start_shard()
    keys, codes = await fill(shard.stub, rng)
    target = "work-042"
    reply = await shard.stub.Detect(
        index_pb2.DetectRequest(
            collection="kolaa",
            model=CVAE,
            query=near_copy(keys[target], 3, rng),
            max_hamming=12,
            fallback_k=16,
        ),
        timeout=10,
    )
    assert reply.stage1_count >= 1 and reply.candidates[0].id == target
    assert reply.candidates[0].hamming == 3 and reply.candidates[0].cosine > 0.99
    assert reply.candidates[0].metadata.title == f"work {target}"
    assert reply.searched == 300 and reply.shard_id == 0 and not reply.nearest

    exact = codes["img-007"]
    reply = await shard.stub.Similar(
        index_pb2.SimilarRequest(collection="free", model=TBH, query=exact, top_n=10),
        timeout=10,
    )
    assert reply.hits[0].id == "img-007" and reply.hits[0].hamming == 0
    assert reply.hits[0].fine_cosine == pytest.approx(1.0)
    order = [(h.hamming, -h.fine_cosine, h.id) for h in reply.hits]
    assert order == sorted(order) and len(order) == 10

    stats = await shard.stub.Stats(index_pb2.StatsRequest(), timeout=10)
    assert stats.ready and stats.num_shards == 1
    assert [(c.name, c.kind, c.items, c.code_bits) for c in stats.collections] == [
        ("free", COPYRIGHT_FREE, 300, 16),
        ("kolaa", REGISTRY, 300, 64),
    ]
    assert all(c.memory_bytes > 0 for c in stats.collections)


async def test_restart_from_redis_gives_the_same_answers(start_shard, rng) -> None:
    first = await start_shard()
    keys, codes = await fill(first.stub, rng)
    # replace some, delete some, so the log holds tombstones too
    await first.stub.Upsert(
        index_pb2.UpsertRequest(
            collection="kolaa",
            kind=REGISTRY,
            model=CVAE,
            items=[
                registry_item(f"work-{i:03d}", random_keys(rng), "v2")
                for i in range(30)
            ],
        ),
        timeout=10,
    )
    deleted = await first.stub.Delete(
        index_pb2.DeleteRequest(
            collection="kolaa", ids=["work-100", "work-101", "ghost"]
        ),
        timeout=10,
    )
    assert deleted.deleted == 2 and list(deleted.missing_ids) == ["ghost"]
    requests = queries(keys, codes, rng)
    before = await answers(first.stub, requests)
    stats_before = await first.stub.Stats(index_pb2.StatsRequest(), timeout=10)
    await first.close()

    second = await start_shard()  # new ShardIndex, same Redis
    assert await answers(second.stub, requests) == before
    stats_after = await second.stub.Stats(index_pb2.StatsRequest(), timeout=10)
    assert [(c.name, c.items, c.tombstones) for c in stats_after.collections] == [
        (c.name, c.items, c.tombstones) for c in stats_before.collections
    ]
    assert [c.items for c in stats_after.collections] == [300, 298]


class GatedStore(InMemoryShardStore):
    """A store whose load waits for a gate, to observe the not-yet-loaded shard."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def load(self, shard: ShardIndex) -> LoadReport:
        assert self.gate.wait(10)
        return super().load(shard)


async def test_readiness_is_not_serving_until_the_shard_is_loaded(
    start_shard, rng
) -> None:
    store = GatedStore()
    shard = await start_shard(store, load=False)
    health = health_pb2_grpc.HealthStub(shard.channel)

    async def status() -> int:
        reply = await health.Check(
            health_pb2.HealthCheckRequest(service=INDEX_SERVICE_NAME), timeout=5
        )
        return reply.status

    assert await status() == health_pb2.HealthCheckResponse.NOT_SERVING
    liveness = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert liveness.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await shard.stub.Upsert(
            index_pb2.UpsertRequest(
                collection="kolaa",
                kind=REGISTRY,
                model=CVAE,
                items=[registry_item("a", random_keys(rng))],
            ),
            timeout=5,
        )
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert not (await shard.stub.Stats(index_pb2.StatsRequest(), timeout=5)).ready

    loading = asyncio.create_task(shard.servicer.load())
    await asyncio.sleep(0.05)
    assert await status() == health_pb2.HealthCheckResponse.NOT_SERVING
    store.gate.set()
    await loading
    await shard.running.mark_serving()
    assert await status() == health_pb2.HealthCheckResponse.SERVING
    assert (await shard.stub.Stats(index_pb2.StatsRequest(), timeout=5)).ready


async def test_a_failed_store_write_is_neither_acknowledged_nor_applied(
    start_shard, rng
) -> None:
    store = InMemoryShardStore()
    shard = await start_shard(store)
    store.fail_writes = True
    request = index_pb2.UpsertRequest(
        collection="kolaa",
        kind=REGISTRY,
        model=CVAE,
        items=[registry_item("a", random_keys(rng))],
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await shard.stub.Upsert(request, timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert not (await shard.stub.Stats(index_pb2.StatsRequest(), timeout=5)).collections
    store.fail_writes = False
    assert (await shard.stub.Upsert(request, timeout=5)).upserted == 1


def _first_id_not_on(shard_id: int, num_shards: int) -> str:
    return next(
        f"id-{i}"
        for i in range(100)
        if routing.shard_for(f"id-{i}", num_shards) != shard_id
    )


KEYS = common_pb2.DetectionKeys(first_key=bytes(8), second_key=bytes(128))
CODE = common_pb2.RetrievalCode(code=bytes(2), code_bits=16, fine=bytes(16))


def _upsert(**kw) -> index_pb2.UpsertRequest:
    base = {
        "collection": "kolaa",
        "kind": REGISTRY,
        "model": CVAE,
        "items": [index_pb2.IndexItem(id="a", keys=KEYS)],
    }
    base.update(kw)
    return index_pb2.UpsertRequest(**base)


def _detect(**kw) -> index_pb2.DetectRequest:
    base = {
        "collection": "kolaa",
        "model": CVAE,
        "query": KEYS,
        "max_hamming": 12,
        "fallback_k": 16,
    }
    base.update(kw)
    return index_pb2.DetectRequest(**base)


def _similar(**kw) -> index_pb2.SimilarRequest:
    base = {"collection": "free", "model": TBH, "query": CODE, "top_n": 10}
    base.update(kw)
    return index_pb2.SimilarRequest(**base)


BAD_REQUESTS = [
    # (method, request, status, words the message must contain)
    ("Upsert", _upsert(collection="has space"), "INVALID_ARGUMENT", ["collection"]),
    ("Upsert", _upsert(collection=""), "INVALID_ARGUMENT", ["collection"]),
    (
        "Upsert",
        _upsert(kind=common_pb2.COLLECTION_KIND_UNSPECIFIED),
        "INVALID_ARGUMENT",
        ["kind"],
    ),
    (
        "Upsert",
        _upsert(model=common_pb2.ModelRef(name="cvae")),
        "INVALID_ARGUMENT",
        ["model.version"],
    ),
    (
        "Upsert",
        _upsert(items=[index_pb2.IndexItem(id="x" * 257, keys=KEYS)]),
        "INVALID_ARGUMENT",
        ["items[0].id", "256"],
    ),
    (
        "Upsert",
        _upsert(items=[index_pb2.IndexItem(id="", keys=KEYS)]),
        "INVALID_ARGUMENT",
        ["items[0].id"],
    ),
    (
        "Upsert",
        _upsert(
            items=[
                index_pb2.IndexItem(id="b", keys=KEYS),
                index_pb2.IndexItem(
                    id="c",
                    keys=common_pb2.DetectionKeys(
                        first_key=bytes(7), second_key=bytes(128)
                    ),
                ),
            ]
        ),
        "INVALID_ARGUMENT",
        ["items[1].keys.first_key", "8"],
    ),
    (
        "Upsert",
        _upsert(
            items=[
                index_pb2.IndexItem(
                    id="b", keys=common_pb2.DetectionKeys(first_key=bytes(8))
                )
            ]
        ),
        "INVALID_ARGUMENT",
        ["items[0].keys.second_key"],
    ),
    (
        "Upsert",
        _upsert(items=[index_pb2.IndexItem(id="a", keys=KEYS)] * 2),
        "INVALID_ARGUMENT",
        ["items[1].id", "twice"],
    ),
    (
        "Upsert",
        _upsert(items=[index_pb2.IndexItem(id="a", keys=KEYS)] * 10_001),
        "INVALID_ARGUMENT",
        ["10000"],
    ),
    (
        "Upsert",
        _upsert(model=common_pb2.ModelRef(name="cvae", version="2.0.0")),
        "FAILED_PRECONDITION",
        ["1.0.0", "2.0.0"],
    ),
    (
        "Upsert",
        _upsert(kind=COPYRIGHT_FREE, items=[index_pb2.IndexItem(id="a", code=CODE)]),
        "FAILED_PRECONDITION",
        ["registry"],
    ),
    (
        "Upsert",
        _upsert(
            collection="free",
            kind=COPYRIGHT_FREE,
            model=TBH,
            items=[
                index_pb2.IndexItem(
                    id="z", code=common_pb2.RetrievalCode(code=bytes(2), code_bits=12)
                )
            ],
        ),
        "INVALID_ARGUMENT",
        ["items[0].code.code_bits"],
    ),
    (
        "Upsert",
        _upsert(
            collection="new",
            kind=COPYRIGHT_FREE,
            model=TBH,
            items=[
                index_pb2.IndexItem(id="z", code=CODE),
                index_pb2.IndexItem(
                    id="y",
                    code=common_pb2.RetrievalCode(
                        code=bytes(2), code_bits=16, fine=bytes(3)
                    ),
                ),
            ],
        ),
        "INVALID_ARGUMENT",
        ["items[1].code.fine"],
    ),
    (
        "Delete",
        index_pb2.DeleteRequest(collection="nope", ids=["a"]),
        "NOT_FOUND",
        ["nope"],
    ),
    (
        "Delete",
        index_pb2.DeleteRequest(collection="kolaa", ids=[""]),
        "INVALID_ARGUMENT",
        ["ids[0]"],
    ),
    ("Detect", _detect(collection="nope"), "NOT_FOUND", ["nope"]),
    ("Detect", _detect(max_hamming=65), "INVALID_ARGUMENT", ["max_hamming", "64"]),
    ("Detect", _detect(fallback_k=1001), "INVALID_ARGUMENT", ["fallback_k"]),
    ("Detect", _detect(max_candidates=10_001), "INVALID_ARGUMENT", ["max_candidates"]),
    (
        "Detect",
        _detect(model=common_pb2.ModelRef(name="cvae", version="0.9")),
        "FAILED_PRECONDITION",
        ["1.0.0", "0.9"],
    ),
    (
        "Detect",
        _detect(
            query=common_pb2.DetectionKeys(first_key=bytes(8), second_key=bytes(10))
        ),
        "INVALID_ARGUMENT",
        ["query.second_key"],
    ),
    (
        "Detect",
        _detect(query=common_pb2.DetectionKeys(second_key=bytes(128))),
        "INVALID_ARGUMENT",
        ["query.first_key"],
    ),
    (
        "Detect",
        _detect(collection="free", model=TBH),
        "FAILED_PRECONDITION",
        ["copyright-free"],
    ),
    ("Similar", _similar(top_n=0), "INVALID_ARGUMENT", ["top_n"]),
    ("Similar", _similar(top_n=1001), "INVALID_ARGUMENT", ["top_n"]),
    (
        "Similar",
        _similar(
            collection="kolaa",
            model=CVAE,
            query=common_pb2.RetrievalCode(code=bytes(8), code_bits=64),
        ),
        "FAILED_PRECONDITION",
        ["registry"],
    ),
    (
        "Similar",
        _similar(
            query=common_pb2.RetrievalCode(code=bytes(3), code_bits=16, fine=bytes(16))
        ),
        "INVALID_ARGUMENT",
        ["query.code"],
    ),
    (
        "Similar",
        _similar(
            query=common_pb2.RetrievalCode(code=bytes(4), code_bits=32, fine=bytes(16))
        ),
        "INVALID_ARGUMENT",
        ["query.code_bits"],
    ),
    (
        "Similar",
        _similar(
            query=common_pb2.RetrievalCode(code=bytes(2), code_bits=16, fine=bytes(4))
        ),
        "INVALID_ARGUMENT",
        ["query.fine"],
    ),
    (
        "Similar",
        _similar(model=common_pb2.ModelRef(name="tbh", version="9")),
        "FAILED_PRECONDITION",
        ["'1.0.0'", "'9'"],
    ),
]


async def test_bad_requests_get_the_right_status_naming_the_field(start_shard) -> None:
    shard = await start_shard()
    await shard.stub.Upsert(_upsert(), timeout=5)
    await shard.stub.Upsert(
        _upsert(
            collection="free",
            kind=COPYRIGHT_FREE,
            model=TBH,
            items=[index_pb2.IndexItem(id="f", code=CODE)],
        ),
        timeout=5,
    )
    failures = []
    for method, request, status, words in BAD_REQUESTS:
        try:
            await getattr(shard.stub, method)(request, timeout=5)
            failures.append((method, request, "succeeded"))
            continue
        except grpc.aio.AioRpcError as e:
            details = e.details() or ""
            if e.code().name != status or not all(w in details for w in words):
                failures.append((method, str(request)[:120], e.code().name, details))
    assert not failures
    # nothing above changed the data
    stats = await shard.stub.Stats(index_pb2.StatsRequest(), timeout=5)
    assert [(c.name, c.items) for c in stats.collections] == [("free", 1), ("kolaa", 1)]


async def test_items_of_another_shard_are_refused(start_shard) -> None:
    shard = await start_shard(shard_id=1, num_shards=2)
    foreign = _first_id_not_on(1, 2)
    for method, request, field in [
        (
            "Upsert",
            _upsert(items=[index_pb2.IndexItem(id=foreign, keys=KEYS)]),
            "items[0].id",
        ),
        (
            "Delete",
            index_pb2.DeleteRequest(collection="kolaa", ids=[foreign]),
            "ids[0]",
        ),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await getattr(shard.stub, method)(request, timeout=5)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert field in (err.value.details() or "")
        assert "belongs to shard 0" in (err.value.details() or "")
    own = next(f"id-{i}" for i in range(100) if routing.shard_for(f"id-{i}", 2) == 1)
    reply = await shard.stub.Upsert(
        _upsert(items=[index_pb2.IndexItem(id=own, keys=KEYS)]), timeout=5
    )
    assert reply.upserted == 1


async def test_many_replaces_trigger_compaction_and_survive_restart(
    start_shard, redis_server, rng
) -> None:
    first = await start_shard()
    for version in range(4):
        reply = await first.stub.Upsert(
            index_pb2.UpsertRequest(
                collection="kolaa",
                kind=REGISTRY,
                model=CVAE,
                items=[
                    registry_item(f"w{i}", random_keys(rng), f"v{version}")
                    for i in range(50)
                ],
            ),
            timeout=10,
        )
        assert reply.replaced == (50 if version else 0)
        await first.servicer.compactions_done()  # compaction runs in the background
    stats = await first.stub.Stats(index_pb2.StatsRequest(), timeout=5)
    (coll,) = stats.collections
    # compacted after v2 (100 tombstones > 150 rows / 2): snapshot + the v3 segment
    assert (coll.items, coll.tombstones) == (50, 50)
    assert redis_server.client().llen("copyfree:v1:{kolaa:0}:log") == 2
    await first.close()
    second = await start_shard()
    reply = await second.stub.Detect(
        _detect(max_hamming=64, max_candidates=1000), timeout=5
    )
    assert sorted(c.id for c in reply.candidates) == sorted(f"w{i}" for i in range(50))
    assert {c.metadata.title for c in reply.candidates} == {"v3"}


class SlowWriteStore(InMemoryShardStore):
    """A store whose writes wait for a gate (a slow Redis)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def append_upsert(self, spec, batch) -> None:
        assert self.gate.wait(10)
        super().append_upsert(spec, batch)


async def test_a_cancelled_upsert_still_lands_in_store_and_memory_together(
    start_shard, rng
) -> None:
    store = SlowWriteStore()
    shard = await start_shard(store)
    request = index_pb2.UpsertRequest(
        collection="kolaa",
        kind=REGISTRY,
        model=CVAE,
        items=[registry_item("late", random_keys(rng))],
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await shard.stub.Upsert(request, timeout=0.2)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    store.gate.set()
    for _ in range(100):  # bounded: the shielded write finishes in the background
        stats = await shard.stub.Stats(index_pb2.StatsRequest(), timeout=5)
        if stats.collections:
            break
        await asyncio.sleep(0.02)
    assert [c.items for c in stats.collections] == [1]
    reloaded = ShardIndex()
    store.load(reloaded)
    assert [s.items for s in reloaded.stats()] == [1]
