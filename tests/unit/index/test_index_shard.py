"""ShardIndex / CollectionIndex against a pure-Python brute-force oracle, with the
search pinned to each method (multi-index hashing with 16-bit or wide groups, blocked
scan) on data small enough for the oracle."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np
import pytest

from copyfree.errors import FailedPrecondition, InvalidInput, NotFound
from copyfree_index import mih, search
from copyfree_index.shard import (
    CollectionIndex,
    CollectionKind,
    CollectionSpec,
    ItemBatch,
    Metadata,
    ModelRef,
    ShardIndex,
)

MODEL = ModelRef("cvae", "1.0.0")
TBH = ModelRef("tbh", "2.1")


@pytest.fixture(params=["auto", "mih16", "mih-wide", "scan"], autouse=True)
def method(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs once per search method: tables from 64 rows, and for
    "mih-wide" the 22/21/21 layout that large collections get."""
    if request.param != "auto":
        monkeypatch.setattr(mih, "MIN_ROWS", 64)
        monkeypatch.setattr(
            search, "FORCE_METHOD", "scan" if request.param == "scan" else "mih"
        )
    if request.param == "mih-wide":
        monkeypatch.setattr(mih, "WIDE_ROWS", 64)
    return str(request.param)


# ------------------------------------------------------------------------- oracle


@dataclass
class Item:
    code: bytes
    vector: tuple[int, ...]
    meta: Metadata


def o_hamming(a: bytes, b: bytes) -> int:
    return bin(int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).count("1")


def o_cosine(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return float(np.float32(dot / norm)) if norm > 0 else 0.0


def o_detect(
    items: dict[str, Item], q1: bytes, q2: tuple[int, ...], r: int, k: int, cap: int
) -> tuple[list[tuple[str, int, float]], int, list[tuple[str, int, float]]]:
    rows = [
        (i, o_hamming(it.code, q1), o_cosine(it.vector, q2)) for i, it in items.items()
    ]
    stage1 = sorted((x for x in rows if x[1] <= r), key=lambda x: (-x[2], x[0]))
    if stage1:
        return stage1[:cap], len(stage1), []
    return [], 0, sorted(rows, key=lambda x: (x[1], x[0]))[:k]


def o_similar(
    items: dict[str, Item], code: bytes, fine: tuple[int, ...], n: int
) -> list[tuple[str, int, float]]:
    rows = [
        (i, o_hamming(it.code, code), o_cosine(it.vector, fine))
        for i, it in items.items()
    ]
    return sorted(rows, key=lambda x: (x[1], -x[2], x[0]))[:n]


# ------------------------------------------------------------------------ helpers


def flip_bits(code: bytes, count: int, rng: np.random.Generator) -> bytes:
    bits = np.unpackbits(np.frombuffer(code, np.uint8))
    idx = rng.choice(bits.size, size=count, replace=False)
    bits[idx] ^= 1
    return np.packbits(bits).tobytes()


def batch_of(ids: list[str], items: list[Item], dtype: type) -> ItemBatch:
    return ItemBatch.of(
        ids,
        np.array([np.frombuffer(it.code, np.uint8) for it in items]).reshape(
            len(ids), -1
        ),
        np.array([it.vector for it in items], dtype=dtype).reshape(len(ids), -1),
        [it.meta for it in items],
    )


def registry_items(
    rng: np.random.Generator, n: int, query: bytes, prefix: str = "w"
) -> dict[str, Item]:
    """Items at every distance 0..20 from the query (several at each), plus random
    ones; second keys from a small pool so cosines tie exactly (ties -> id order)."""
    pool = [tuple(int(v) for v in rng.integers(-3000, 3000, 64)) for _ in range(6)]
    pool.append((0,) * 64)  # zero vector: cosine 0
    ids = [f"{prefix}{j:05d}" for j in rng.permutation(n)]  # id order != row order
    out: dict[str, Item] = {}
    for i, item_id in enumerate(ids):
        if i < 3 * 21:
            code = flip_bits(query, i % 21, rng)
        else:
            code = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
        vec = pool[int(rng.integers(len(pool)))]
        out[item_id] = Item(code, vec, Metadata(title=f"t-{item_id}"))
    return out


def as_tuples(hits: list) -> list[tuple[str, int, float]]:
    return [
        (h.id, h.hamming, getattr(h, "cosine", getattr(h, "fine_cosine", None)))
        for h in hits
    ]


def load_registry(
    shard: ShardIndex, name: str, items: dict[str, Item], step: int = 37
) -> None:
    spec = CollectionSpec.registry(name, MODEL)
    keys = list(items)
    for i in range(0, len(keys), step):
        chunk = keys[i : i + step]
        shard.upsert(spec, batch_of(chunk, [items[k] for k in chunk], np.int16))


def detect(
    shard: ShardIndex,
    name: str,
    q1: bytes,
    q2: tuple[int, ...],
    r: int,
    k: int,
    cap: int,
):
    q2_bytes = np.array(q2, dtype="<i2").tobytes()
    return shard.detect(name, MODEL, q1, q2_bytes, r, k, cap)


# -------------------------------------------------------------------------- tests


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("radius", [0, 5, 12, 20])
def test_detect_equals_brute_force_including_threshold_and_ties(
    seed: int, radius: int
) -> None:
    rng = np.random.default_rng(seed)
    query = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
    items = registry_items(rng, 700, query)
    shard = ShardIndex()
    load_registry(shard, "works", items)
    q2 = tuple(int(v) for v in rng.integers(-3000, 3000, 64))
    for cap in (1, 10, 1000):
        got = detect(shard, "works", query, q2, radius, 16, cap)
        want_c, want_count, want_near = o_detect(items, query, q2, radius, 16, cap)
        assert as_tuples(got.candidates) == want_c
        assert got.stage1_count == want_count
        assert as_tuples(got.nearest) == want_near
        assert got.searched == len(items)
    # the threshold is inclusive: items at exactly `radius` bits are in stage 1
    assert any(
        h.hamming == radius
        for h in detect(shard, "works", query, q2, radius, 0, 1000).candidates
    )


@pytest.mark.parametrize("k", [0, 1, 16, 5000])
def test_detect_fallback_nearest_equals_brute_force(
    k: int, rng: np.random.Generator
) -> None:
    query = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
    items = {
        f"x{i:04d}": Item(
            flip_bits(query, 10 + i % 7, rng), (i % 3 + 1,) * 64, Metadata()
        )
        for i in rng.permutation(300)
    }
    shard = ShardIndex()
    load_registry(shard, "works", items)
    q2 = tuple(int(v) for v in rng.integers(-100, 100, 64))
    got = detect(shard, "works", query, q2, 9, k, 100)
    assert got.candidates == [] and got.stage1_count == 0
    assert as_tuples(got.nearest) == o_detect(items, query, q2, 9, k, 100)[2]
    assert len(got.nearest) == min(k, len(items))


@pytest.mark.parametrize("code_bits", [16, 64])
@pytest.mark.parametrize("top_n", [1, 7, 50, 1000])
def test_similar_equals_brute_force_with_huge_ties(code_bits: int, top_n: int) -> None:
    rng = np.random.default_rng(code_bits * 1000 + top_n)
    nbytes = code_bits // 8
    fine_pool = [tuple(int(v) for v in rng.integers(-128, 128, 8)) for _ in range(4)]
    items = {}
    for j in rng.permutation(900):
        code = rng.integers(0, 256, nbytes, dtype=np.uint8).tobytes()
        fine = (
            fine_pool[j % 4]
            if j % 3
            else tuple(int(v) for v in rng.integers(-128, 128, 8))
        )
        items[f"cf-{j:04d}"] = Item(code, fine, Metadata(licence="CC0"))
    spec = CollectionSpec("free", CollectionKind.COPYRIGHT_FREE, TBH, code_bits, 8)
    shard = ShardIndex()
    keys = list(items)
    for i in range(0, len(keys), 100):
        chunk = keys[i : i + 100]
        shard.upsert(spec, batch_of(chunk, [items[k] for k in chunk], np.int8))
    for _ in range(3):
        q = rng.integers(0, 256, nbytes, dtype=np.uint8).tobytes()
        qf = tuple(int(v) for v in rng.integers(-128, 128, 8))
        got = shard.similar(
            "free", TBH, q, code_bits, np.array(qf, np.int8).tobytes(), top_n
        )
        assert as_tuples(got.hits) == o_similar(items, q, qf, top_n)
        assert got.searched == len(items)


def test_replace_and_delete_leave_tombstones_and_answers_match_oracle(
    rng: np.random.Generator,
) -> None:
    query = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
    items = registry_items(rng, 400, query)
    shard = ShardIndex()
    load_registry(shard, "works", items)
    spec = CollectionSpec.registry("works", MODEL)
    keys = sorted(items)
    # replace 50 ids with new keys (some moved next to the query), delete 60 others
    replaced_ids = keys[:50]
    new = {
        k: Item(flip_bits(query, i % 4, rng), items[k].vector, Metadata(title="new"))
        for i, k in enumerate(replaced_ids)
    }
    upserted, replaced = shard.upsert(
        spec, batch_of(replaced_ids, list(new.values()), np.int16)
    )
    assert (upserted, replaced) == (50, 50)
    items.update(new)
    deleted, missing = shard.delete("works", [*keys[100:160], "nope"])
    assert deleted == keys[100:160] and missing == ["nope"]
    for k in keys[100:160]:
        del items[k]
    (stats,) = shard.stats()
    assert (stats.items, stats.tombstones) == (len(items), 110)
    q2 = tuple(int(v) for v in rng.integers(-3000, 3000, 64))
    for r in (0, 3, 12):
        got = detect(shard, "works", query, q2, r, 16, 1000)
        want = o_detect(items, query, q2, r, 16, 1000)
        assert (
            as_tuples(got.candidates),
            got.stage1_count,
            as_tuples(got.nearest),
        ) == want
    assert {
        h.id: h.metadata.title
        for h in detect(shard, "works", query, q2, 3, 0, 1000).candidates
        if h.id in new
    } == {k: "new" for k, v in new.items() if o_hamming(v.code, query) <= 3}
    # compaction keeps the answers and drops the tombstones
    shard.compact("works")
    (stats,) = shard.stats()
    assert (stats.items, stats.tombstones) == (len(items), 0)
    got = detect(shard, "works", query, q2, 12, 16, 1000)
    assert as_tuples(got.candidates) == o_detect(items, query, q2, 12, 16, 1000)[0]


def test_repeated_id_in_one_batch_keeps_the_last_copy() -> None:
    spec = CollectionSpec.registry("works", MODEL)
    coll = CollectionIndex(spec)
    codes = np.array([[1] * 8, [2] * 8, [3] * 8], np.uint8)
    vecs = np.ones((3, 64), np.int16)
    replaced = coll.upsert(ItemBatch.of(["a", "b", "a"], codes, vecs))
    assert replaced == 0 and coll.live == 2 and coll.tombstones == 1
    assert coll.live_batch().id_list() == ["b", "a"]
    assert coll.live_batch().codes[1].tolist() == [3] * 8


def test_capacity_doubles_and_old_snapshots_stay_valid(
    rng: np.random.Generator,
) -> None:
    spec = CollectionSpec.registry("works", MODEL)
    coll = CollectionIndex(spec, capacity=4)
    codes = rng.integers(0, 256, (1000, 8), dtype=np.uint8)
    vecs = rng.integers(-500, 500, (1000, 64)).astype(np.int16)
    coll.upsert(ItemBatch.of([f"i{j}" for j in range(3)], codes[:3], vecs[:3]))
    snap = coll.snapshot()
    before = snap.words.copy()
    for start in range(3, 1000, 97):
        end = min(start + 97, 1000)
        coll.upsert(
            ItemBatch.of(
                [f"i{j}" for j in range(start, end)], codes[start:end], vecs[start:end]
            )
        )
    coll.delete(["i0", "i1"])
    assert coll.capacity == 1024 and coll.rows == 1000 and coll.live == 998
    # the snapshot from before growth and deletes is unchanged
    assert np.array_equal(snap.words, before) and snap.alive.all() and snap.live == 3
    batch = coll.live_batch()
    assert np.array_equal(batch.codes, codes[2:]) and np.array_equal(
        batch.vectors, vecs[2:]
    )
    assert batch.id_list() == [f"i{j}" for j in range(2, 1000)]


def test_searches_run_while_writes_happen(rng: np.random.Generator) -> None:
    shard = ShardIndex()
    spec = CollectionSpec.registry("works", MODEL)
    codes = rng.integers(0, 256, (4001, 8), dtype=np.uint8)
    vecs = rng.integers(-500, 500, (4001, 64)).astype(np.int16)
    shard.upsert(spec, ItemBatch.of(["seed"], codes[:1], vecs[:1]))
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for start in range(1, 4001, 100):
                ids = [f"i{j}" for j in range(start, start + 100)]
                rows = slice(start, start + 100)
                batch = ItemBatch.of(ids, codes[rows], vecs[rows])
                shard.upsert(spec, batch)
                shard.delete("works", ids[:10])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def reader() -> None:
        try:
            for _ in range(30):
                res = shard.detect(
                    "works",
                    MODEL,
                    codes[0].tobytes(),
                    vecs[0].astype("<i2").tobytes(),
                    64,
                    0,
                    10_000,
                )
                ids = [h.id for h in res.candidates]
                assert len(ids) == len(set(ids)) == res.stage1_count == res.searched
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [
        threading.Thread(target=writer),
        *(threading.Thread(target=reader) for _ in range(2)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert shard.stats()[0].items == 1 + 40 * 90


def test_errors_name_what_is_wrong() -> None:
    shard = ShardIndex()
    spec = CollectionSpec.registry("works", MODEL)
    shard.upsert(
        spec,
        ItemBatch.of(["a"], np.zeros((1, 8), np.uint8), np.ones((1, 64), np.int16)),
    )
    key2 = np.ones(64, "<i2").tobytes()
    with pytest.raises(NotFound, match="'nope'"):
        shard.detect("nope", MODEL, bytes(8), key2, 12, 16, 10)
    with pytest.raises(FailedPrecondition, match=r"'1\.0\.0'.*'2\.0\.0'"):
        shard.detect("works", ModelRef("cvae", "2.0.0"), bytes(8), key2, 12, 16, 10)
    with pytest.raises(InvalidInput, match="query.first_key must be 8 bytes"):
        shard.detect("works", MODEL, bytes(7), key2, 12, 16, 10)
    with pytest.raises(InvalidInput, match="query.second_key must be 128 bytes"):
        shard.detect("works", MODEL, bytes(8), key2[:-2], 12, 16, 10)
    with pytest.raises(FailedPrecondition, match="registry collection"):
        shard.similar("works", MODEL, bytes(8), 64, b"", 10)
    with pytest.raises(FailedPrecondition, match="registry"):
        shard.check_upsert(
            CollectionSpec("works", CollectionKind.COPYRIGHT_FREE, MODEL, 16, 8)
        )
    with pytest.raises(FailedPrecondition, match="2.0.0"):
        shard.check_upsert(CollectionSpec.registry("works", ModelRef("cvae", "2.0.0")))
    cf = CollectionSpec("free", CollectionKind.COPYRIGHT_FREE, TBH, 16, 4)
    shard.upsert(
        cf, ItemBatch.of(["c"], np.zeros((1, 2), np.uint8), np.ones((1, 4), np.int8))
    )
    with pytest.raises(InvalidInput, match="query.code_bits is 32"):
        shard.similar("free", TBH, bytes(4), 32, bytes(4), 1)
    with pytest.raises(InvalidInput, match="query.code must be 2 bytes"):
        shard.similar("free", TBH, bytes(3), 16, bytes(4), 1)
    with pytest.raises(InvalidInput, match="query.fine must be 4 bytes"):
        shard.similar("free", TBH, bytes(2), 16, bytes(5), 1)
    with pytest.raises(InvalidInput, match="code_bits 32"):
        shard.check_upsert(
            CollectionSpec("free", CollectionKind.COPYRIGHT_FREE, TBH, 32, 4)
        )
