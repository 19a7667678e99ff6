"""One ShardStore contract, run against InMemoryShardStore and RedisShardStore (real
redis-server), plus the segment format."""

from __future__ import annotations

import struct
import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from copyfree_index.embedded_redis import RedisProcess
from copyfree_index.shard import (
    CollectionKind,
    CollectionSpec,
    ItemBatch,
    Metadata,
    ModelRef,
    ShardIndex,
)
from copyfree_index.store import (
    FORMAT_VERSION,
    Deletion,
    InMemoryShardStore,
    RedisShardStore,
    ShardStore,
    decode_segment,
    encode_delete,
    encode_upsert,
)

REGISTRY = CollectionSpec.registry("works", ModelRef("cvae", "1.0.0"))
FREE = CollectionSpec(
    "free.photos", CollectionKind.COPYRIGHT_FREE, ModelRef("tbh", "3"), 16, 12
)


def make_batch(
    spec: CollectionSpec, ids: list[str], rng: np.random.Generator
) -> ItemBatch:
    n = len(ids)
    info = np.iinfo(spec.vector_dtype)
    return ItemBatch.of(
        ids,
        rng.integers(0, 256, (n, spec.code_bytes), dtype=np.uint8),
        rng.integers(info.min, info.max, (n, spec.vector_dim), endpoint=True).astype(
            spec.vector_dtype
        ),
        [
            Metadata(title=f"Titel {i} – ü", owner="KOLAA" if j % 2 else "")
            for j, i in enumerate(ids)
        ],
    )


def state(shard: ShardIndex) -> dict[str, tuple]:
    """Everything observable: specs, live rows (ids, codes, vectors, metadata)."""
    out = {}
    for stats in shard.stats():
        b = shard.live_batch(stats.spec.name)
        ids = b.id_list()
        metadata = b.metadata_list()
        order = np.argsort(np.array(ids))
        out[stats.spec.name] = (
            stats.spec,
            sorted(ids),
            b.codes[order].tobytes(),
            b.vectors[order].tobytes(),
            [metadata[i] for i in order],
        )
    return out


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> Iterator[ShardStore]:
    if request.param == "memory":
        yield InMemoryShardStore()
        return
    server: RedisProcess = request.getfixturevalue("redis_server")
    s = RedisShardStore.from_url(
        server.url, shard_id=3, key_prefix=f"t{uuid.uuid4().hex[:8]}"
    )
    yield s
    s.close()


class Writer:
    """Applies each change to the store first, then to memory (as the servicer does)."""

    def __init__(self, store: ShardStore) -> None:
        self.store, self.shard = store, ShardIndex()

    def upsert(self, spec: CollectionSpec, batch: ItemBatch) -> None:
        self.store.append_upsert(spec, batch)
        self.shard.upsert(spec, batch)

    def delete(self, spec: CollectionSpec, ids: list[str]) -> None:
        present = self.shard.present(spec.name, ids)
        self.store.append_delete(spec, present)
        self.shard.delete(spec.name, ids)

    def compact(self, spec: CollectionSpec) -> None:
        self.store.compact(spec, self.shard.live_batch(spec.name))
        self.shard.compact(spec.name)

    def reloaded(self) -> ShardIndex:
        fresh = ShardIndex()
        self.store.load(fresh)
        return fresh


def test_round_trip_of_both_kinds(store: ShardStore, rng: np.random.Generator) -> None:
    w = Writer(store)
    for start in range(0, 300, 100):
        ids = [f"w{i}" for i in range(start, start + 100)]
        w.upsert(REGISTRY, make_batch(REGISTRY, ids, rng))
    w.upsert(FREE, make_batch(FREE, [f"f{i}" for i in range(50)], rng))
    fresh = ShardIndex()
    report = store.load(fresh)
    assert (report.collections, report.segments, report.items) == (2, 4, 350)
    assert state(fresh) == state(w.shard)
    q = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
    k2 = rng.integers(-999, 999, 64).astype("<i2").tobytes()
    assert fresh.detect("works", REGISTRY.model, q, k2, 30, 16, 50) == w.shard.detect(
        "works", REGISTRY.model, q, k2, 30, 16, 50
    )


def test_replaces_and_deletes_replay_in_order(
    store: ShardStore, rng: np.random.Generator
) -> None:
    w = Writer(store)
    w.upsert(REGISTRY, make_batch(REGISTRY, [f"w{i}" for i in range(40)], rng))
    w.upsert(
        REGISTRY, make_batch(REGISTRY, [f"w{i}" for i in range(10)], rng)
    )  # replace
    w.delete(REGISTRY, ["w5", "w20", "unknown"])
    w.upsert(REGISTRY, make_batch(REGISTRY, ["w20"], rng))  # re-add after delete
    fresh = w.reloaded()
    assert state(fresh) == state(w.shard)
    (stats,) = fresh.stats()
    assert stats.items == 39
    assert stats.tombstones == 12  # 10 replaced + 2 deleted; replay never compacts
    # a delete removing everything still leaves the (empty) collection
    w.delete(REGISTRY, [f"w{i}" for i in range(40)])
    assert [(s.spec, s.items) for s in w.reloaded().stats()] == [(REGISTRY, 0)]


def test_compaction_rewrites_the_log_and_reload_equals_before(
    store: ShardStore, rng: np.random.Generator
) -> None:
    w = Writer(store)
    for _ in range(3):
        w.upsert(
            FREE, make_batch(FREE, [f"f{i}" for i in range(60)], rng)
        )  # 120 tombstones
    w.delete(FREE, [f"f{i}" for i in range(10)])
    before = state(w.shard)
    assert w.shard.needs_compaction(FREE.name)
    w.compact(FREE)
    assert state(w.shard) == before
    assert store.segment_count(FREE.name) == 1  # type: ignore[attr-defined]
    fresh = w.reloaded()
    assert state(fresh) == before
    assert fresh.stats()[0].tombstones == 0
    # later writes append to the compacted log as usual
    w.upsert(FREE, make_batch(FREE, ["late"], rng))
    assert state(w.reloaded()) == state(w.shard)


def test_redis_layout_uses_one_hash_tag_per_collection_and_shard(
    redis_server: RedisProcess, rng: np.random.Generator
) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    store = RedisShardStore.from_url(redis_server.url, shard_id=1, key_prefix=prefix)
    store.append_upsert(REGISTRY, make_batch(REGISTRY, ["a", "b"], rng))
    store.append_delete(REGISTRY, ["a"])
    client = redis_server.client()
    assert sorted(k.decode() for k in client.keys(f"{prefix}:*")) == [
        f"{prefix}:collections:1",
        f"{prefix}:{{works:1}}:log",
        f"{prefix}:{{works:1}}:meta",
    ]
    assert client.hgetall(f"{prefix}:{{works:1}}:meta") == {
        b"format": b"2",
        b"kind": b"registry",
        b"model_name": b"cvae",
        b"model_version": b"1.0.0",
        b"code_bits": b"64",
        b"fine_dim": b"64",
        b"rows": b"2",  # upserted rows in the log: sizes the arrays at reload
    }
    assert client.llen(f"{prefix}:{{works:1}}:log") == 2
    store.close()


def test_segment_round_trip_and_format_checks(rng: np.random.Generator) -> None:
    batch = make_batch(REGISTRY, ["a", "ß", "c"], rng)
    data = encode_upsert(batch)
    assert data[:4] == b"CFSG" and data[4] == FORMAT_VERSION
    got = decode_segment(data, REGISTRY)
    assert isinstance(got, ItemBatch)
    assert got.id_list() == batch.id_list()
    assert got.metadata_list() == batch.metadata_list()
    assert np.array_equal(got.codes, batch.codes) and np.array_equal(
        got.vectors, batch.vectors
    )
    assert got.vectors.dtype == np.int16
    deletion = decode_segment(encode_delete(["x", "y"]), REGISTRY)
    assert isinstance(deletion, Deletion) and deletion.id_list() == ["x", "y"]
    newer = data[:4] + struct.pack("<B", FORMAT_VERSION + 1) + data[5:]
    with pytest.raises(ValueError, match="newer"):
        decode_segment(newer, REGISTRY)
    with pytest.raises(ValueError, match="truncated"):
        decode_segment(data[:-1], REGISTRY)
    with pytest.raises(ValueError, match="do not match"):
        decode_segment(data, FREE)


@pytest.mark.parametrize("recorded", ["kept", "absent", "too_many"])
def test_reload_sizes_arrays_from_the_row_count_and_survives_a_wrong_one(
    recorded: str, redis_server: RedisProcess, rng: np.random.Generator
) -> None:
    """The meta hash counts the upserted rows of the log (appends add, compaction
    resets) so a reload sizes its arrays once. Logs written before the count was kept
    (absent) and a count that disagrees with the log still load exactly."""
    prefix = f"t{uuid.uuid4().hex[:8]}"
    store = RedisShardStore.from_url(redis_server.url, shard_id=0, key_prefix=prefix)
    w = Writer(store)
    for start in range(0, 3000, 1000):
        ids = [f"w{i}" for i in range(start, start + 1000)]
        w.upsert(REGISTRY, make_batch(REGISTRY, ids, rng))
    w.upsert(REGISTRY, make_batch(REGISTRY, ["w5", "w6"], rng))  # replaces two
    w.delete(REGISTRY, ["w7", "w8", "w9"])
    meta = store.meta_key(REGISTRY.name)
    client = redis_server.client()
    assert client.hget(meta, "rows") == b"3002"
    if recorded == "absent":
        client.hdel(meta, "rows")
    elif recorded == "too_many":
        client.hset(meta, "rows", 50_000)
    fresh = w.reloaded()
    assert state(fresh) == state(w.shard)
    assert fresh.stats()[0].items == 2997
    if recorded == "kept":
        assert fresh.collection(REGISTRY.name).capacity == 3002  # sized once
    w.compact(REGISTRY)
    assert client.hget(meta, "rows") == b"2997"  # the snapshot's rows
    w.upsert(REGISTRY, make_batch(REGISTRY, ["late"], rng))
    assert client.hget(meta, "rows") == b"2998"
    assert state(w.reloaded()) == state(w.shard)
    store.close()
