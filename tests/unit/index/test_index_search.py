"""The search layer against brute force: every table layout and method, appends in
many small batches (bucket relocation, garbage compaction), deletes, distances exactly
at the radius, ties at the k-th distance, and searches racing a writer."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from copyfree import codes, hamming
from copyfree_index import mih, search
from copyfree_index.shard import (
    CollectionIndex,
    CollectionKind,
    CollectionSpec,
    ItemBatch,
    ModelRef,
    Snapshot,
)

MODEL = ModelRef("m", "1")

# (code bits, wide groups?) -> the layouts the index builds
LAYOUTS = [
    (64, False),  # 4 x 16
    (64, True),  # 22 / 21 / 21
    (16, False),  # one 16-bit table: the bucket is the code
    (8, False),
    (24, False),  # 2 x 12
    (32, False),
    (128, False),  # 8 x 16, verified against the codes (two words)
]


def flip(code: np.ndarray, bits: int, rng: np.random.Generator) -> np.ndarray:
    unpacked = np.unpackbits(code)
    unpacked[rng.choice(unpacked.size, bits, replace=False)] ^= 1
    return np.packbits(unpacked)


def dataset(
    bits: int, n: int, rng: np.random.Generator, query: np.ndarray
) -> np.ndarray:
    """Clustered codes plus codes at every distance 0..min(bits, 24) from `query`
    (so radius searches meet rows exactly at the threshold), plus duplicates."""
    nbytes = bits // 8
    out = rng.integers(0, 256, (n, nbytes), dtype=np.uint8)
    centre = rng.integers(0, 256, nbytes, dtype=np.uint8)
    for i in range(0, n // 3):
        out[i] = flip(centre, int(rng.integers(0, max(1, bits // 8))), rng)
    for j, d in enumerate(range(min(bits, 24) + 1)):
        for rep in range(3):
            out[n // 3 + 3 * j + rep] = flip(query, d, rng)
    out[-5:] = out[n // 3]  # identical codes
    return out


def build(
    bits: int, packed: np.ndarray, rng: np.random.Generator, batch: int
) -> CollectionIndex:
    spec = CollectionSpec("c", CollectionKind.COPYRIGHT_FREE, MODEL, bits, 4)
    coll = CollectionIndex(spec)
    n = packed.shape[0]
    for s in range(0, n, batch):
        e = min(n, s + batch)
        ids = [f"i{j}" for j in range(s, e)]
        coll.upsert(ItemBatch.of(ids, packed[s:e], np.ones((e - s, 4), np.int8)))
    return coll


@pytest.fixture(
    params=[
        ("mih", "c"),
        ("mih", "numpy"),
        ("scan", "c"),
        ("scan", "numpy"),
        ("auto", "c"),
    ],
    ids=lambda p: "-".join(p),
)
def method(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """A search method and the scan kernel behind it (the C one's bucket
    verification and scans, or the numpy fallback)."""
    how, kernel = request.param
    if kernel == "c" and hamming._scan is None:
        pytest.skip("copyfree._scan is not built")
    monkeypatch.setattr(hamming, "SCAN_KERNEL", kernel)
    monkeypatch.setattr(mih, "MIN_ROWS", 200)
    if how != "auto":
        monkeypatch.setattr(search, "FORCE_METHOD", how)
    return str(how)


@pytest.mark.parametrize(("bits", "wide"), LAYOUTS)
def test_radius_and_nearest_equal_brute_force(
    bits: int, wide: bool, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if wide:
        monkeypatch.setattr(mih, "WIDE_ROWS", 200)
    rng = np.random.default_rng(bits * 7 + wide)
    query = rng.integers(0, 256, bits // 8, dtype=np.uint8)
    packed = dataset(bits, 1500, rng, query)
    coll = build(bits, packed, rng, batch=97)  # 16 appends: buckets relocate
    # tombstones: deletes and replaces (the replaced rows move to the end)
    coll.delete([f"i{j}" for j in range(0, 1500, 11)])
    coll.upsert(
        ItemBatch.of(
            [f"i{j}" for j in range(1, 1500, 13)],
            packed[1:1500:13],
            np.ones((len(range(1, 1500, 13)), 4), np.int8),
        )
    )
    snap = coll.snapshot()
    if method != "scan":
        assert coll.tables is not None
        groups = [g.width for g in coll.tables.layout.groups]
        assert max(groups) == (22 if wide else min(bits, 16 if bits % 16 == 0 else 12))
    words = snap.words
    queries = [codes.to_words(query[None])[0]] + [
        words[int(rng.integers(words.shape[0]))] for _ in range(4)
    ]
    for q in queries:
        d = hamming.distances(words, q)
        d_live = np.where(snap.alive, d, 10**6)
        for radius in (0, 1, 3, 7, 12, 16, 25):
            rows, dist = search.within(snap.view, q, radius)
            want = np.flatnonzero(d_live <= radius)
            assert rows.tolist() == want.tolist(), radius
            assert dist.tolist() == d[want].tolist()
        for k in (1, 5, 50, 400):
            rows, dist = search.nearest(snap.view, q, k)
            kth = np.sort(d_live)[k - 1]
            want = np.flatnonzero(d_live <= kth)
            assert sorted(rows.tolist()) == want.tolist(), k
            assert sorted(zip(rows.tolist(), dist.tolist(), strict=True)) == list(
                zip(want.tolist(), d[want].tolist(), strict=True)
            )
            assert_exact_top_k(snap.view, q, k, d_live)
        (hits, _), (near, _) = search.detect_search(snap.view, q, 2, 16)
        within = np.flatnonzero(d_live <= 2)
        assert hits.tolist() == within.tolist()
        if not within.size:
            kth = np.sort(d_live)[15]
            assert sorted(near.tolist()) == np.flatnonzero(d_live <= kth).tolist()


def assert_exact_top_k(
    view: search.View, q: np.ndarray, k: int, d_live: np.ndarray
) -> None:
    """nearest_exactly: the k smallest by (distance, row), as faiss orders them."""
    order = np.lexsort((np.arange(d_live.size), d_live))
    want = order[: min(k, int((d_live < 10**6).sum()))]
    rows, dist = search.nearest_exactly(view, q, k)
    assert rows.tolist() == want.tolist()
    assert dist.tolist() == d_live[want].tolist()


def test_sixteen_bit_walk_answers_from_near_buckets_only_when_it_may(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The query's own bucket, or the 17 buckets within distance 1, holding k rows
    answer at once, but not for a snapshot older than the tables (rows appended
    since) nor with tombstones."""
    monkeypatch.setattr(mih, "MIN_ROWS", 200)
    rng = np.random.default_rng(16)
    distinct = rng.integers(0, 256, (8, 2), dtype=np.uint8)
    packed = distinct[rng.integers(0, 8, 3000)]
    coll = build(16, packed, rng, batch=500)

    def check(snap: Snapshot) -> None:
        words, view, alive = snap.words, snap.view, snap.alive
        near = distinct.copy()
        near[:, 0] ^= 0b100  # one bit off: the own bucket is (likely) empty, ring 1 not
        queries = np.concatenate([distinct, near])
        for q in [codes.to_words(queries[i : i + 1])[0] for i in range(16)]:
            d_live = np.where(alive, hamming.distances(words, q), 10**6)
            for k in (1, 5, 100, 2000):
                rows, dist = search.nearest(view, q, k)
                kth = np.sort(d_live)[k - 1]
                assert sorted(rows.tolist()) == np.flatnonzero(d_live <= kth).tolist()
                assert_exact_top_k(view, q, k, d_live)

    old = coll.snapshot()
    check(old)  # nothing written since: own buckets answer k <= their size
    coll.upsert(
        ItemBatch.of(
            [f"new{j}" for j in range(300)],
            np.repeat(distinct[:1], 300, axis=0),
            np.ones((300, 4), np.int8),
        )
    )
    coll.delete([f"i{j}" for j in range(0, 200, 3)])
    check(old)  # rows appended since: dropped
    check(coll.snapshot())  # tombstones


def test_exact_threshold_membership(method: str) -> None:
    """Rows at exactly r are in, at r + 1 out, for every r (inclusive radius)."""
    rng = np.random.default_rng(5)
    query = rng.integers(0, 256, 8, dtype=np.uint8)
    rows = [flip(query, d, rng) for d in range(0, 30) for _ in range(12)]
    filler = list(rng.integers(0, 256, (400, 8), dtype=np.uint8))
    coll = build(64, np.array(rows + filler), rng, batch=50)
    q = codes.to_words(query[None])[0]
    for r in range(0, 29):
        _, dist = search.within(coll.snapshot().view, q, r)
        assert np.count_nonzero(dist == r) >= 12 and dist.max() == r


def test_compacted_tables_answer_the_same(rng: np.random.Generator) -> None:
    packed = rng.integers(0, 256, (3000, 8), dtype=np.uint8)
    layout = mih.choose_layout(64, mih.MIN_ROWS)
    assert layout is not None
    words = codes.to_words(packed)
    tables = mih.MultiIndex.build(layout, words[:100])
    for s in range(100, 3000, 50):
        tables.append(words[s : s + 50], s)
    assert tables.garbage > 0
    tight = tables.compacted()
    assert tight.garbage == 0 and tight.nbytes < tables.nbytes
    q = words[7]
    split = layout.split(12)
    none = (-1,) * layout.m
    for t in (tables, tight):
        found = t.probe(q, none, split, words)
        real = np.flatnonzero(found.dist <= 64)  # window padding reads as 255
        rows, d = found.rows(real), found.dist[real]
        got = sorted(set(zip(rows.tolist(), d.tolist(), strict=True)))
        want_all = hamming.distances(words, q)
        want = [(r, int(want_all[r])) for r in np.flatnonzero(want_all <= 12)]
        assert set(want) <= set(got)
        assert all(want_all[r] == dd for r, dd in got)

    def real_rows(t: mih.MultiIndex) -> list[int]:
        found = t.probe(q, none, split, words)
        return sorted(found.rows(np.flatnonzero(found.dist <= 64)).tolist())

    assert real_rows(tables) == real_rows(tight)


@pytest.mark.parametrize("wide", [False, True])
def test_searches_racing_a_writer_match_their_snapshot(
    wide: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lock-free readers: each search, run while a writer appends (buckets move,
    slot arrays grow, garbage is compacted) and deletes, equals brute force over the
    snapshot it read."""
    monkeypatch.setattr(mih, "MIN_ROWS", 64)
    monkeypatch.setattr(search, "FORCE_METHOD", "mih")
    if wide:
        monkeypatch.setattr(mih, "WIDE_ROWS", 64)
    rng = np.random.default_rng(11)
    packed = rng.integers(0, 256, (6000, 8), dtype=np.uint8)
    packed[::3] = packed[0] ^ (rng.random((2000, 8)) < 0.02).astype(np.uint8)
    coll = build(64, packed[:200], rng, batch=200)
    errors: list[BaseException] = []
    done = threading.Event()

    def writer() -> None:
        try:
            for s in range(200, 6000, 50):
                ids = [f"i{j}" for j in range(s, s + 50)]
                coll.upsert(
                    ItemBatch.of(ids, packed[s : s + 50], np.ones((50, 4), np.int8))
                )
                coll.delete(ids[:5])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            done.set()

    def reader(seed: int) -> None:
        local = np.random.default_rng(seed)
        try:
            while not done.is_set():
                snap = coll.snapshot()
                q = snap.words[int(local.integers(snap.words.shape[0]))]
                d = np.where(snap.alive, hamming.distances(snap.words, q), 10**6)
                rows, _ = search.within(snap.view, q, 10)
                assert rows.tolist() == np.flatnonzero(d <= 10).tolist()
                rows, _ = search.nearest(snap.view, q, 20)
                assert (
                    sorted(rows.tolist())
                    == np.flatnonzero(d <= np.sort(d)[19]).tolist()
                )
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer)] + [
        threading.Thread(target=reader, args=(s,)) for s in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[0]
    assert coll.live == 200 + (5800 // 50) * 45


def test_layout_split_is_the_tightest_exact_one() -> None:
    four = mih.choose_layout(64, mih.MIN_ROWS)
    wide = mih.choose_layout(64, mih.WIDE_ROWS)
    assert four is not None and wide is not None
    assert [g.width for g in four.groups] == [16, 16, 16, 16]
    assert four.split(12) == (3, 2, 2, 2) and four.covered((3, 2, 2, 2)) == 12
    assert [g.width for g in wide.groups] == [22, 21, 21]
    assert wide.split(12) == (4, 3, 3) and wide.covered((4, 3, 3)) == 12
    assert four.split(2) == (0, 0, 0, -1)  # sum(r_i + 1) = 3
    assert mih.choose_layout(64, mih.MIN_ROWS - 1) is None
    sixteen = mih.choose_layout(16, mih.MIN_ROWS)
    assert sixteen is not None and sixteen.full_code and not sixteen.store_codes


def test_planner_prefers_tables_for_small_radii_and_scans_for_large_ones() -> None:
    layout = mih.choose_layout(64, 1_000_000)
    assert layout is not None
    words = np.zeros((1, 1), np.uint64)
    tables = mih.MultiIndex(layout)

    def view(rows: int) -> search.View:
        alive = np.ones(rows, bool)  # only the shape matters to the planner
        return search.View(np.broadcast_to(words, (rows, 1)), alive, rows, 64, tables)

    big = view(1_000_000)
    assert search.method_for_radius(big, 12) == "mih"
    assert search.method_for_radius(big, 40) == "scan"
    assert search.method_for_radius(view(1_000), 12) == "scan"
    no_tables = search.View(words, np.ones(1, bool), 1, 64, None)
    assert search.method_for_radius(no_tables, 0) == "scan"


def test_planner_scans_for_nearest_k_where_probing_would_cost_more(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Measured (benchmarks/bench_index.py): with the C scan, the top-100 of even a
    near copy costs 4 x 16-bit tables more than a scan of 1M rows, while 3 wide
    tables over 10M rows find it for a tenth of a scan."""
    monkeypatch.setattr(hamming, "SCAN_KERNEL", "c")
    words = np.zeros((1, 1), np.uint64)

    def view(rows: int) -> search.View:
        layout = mih.choose_layout(64, rows)
        assert layout is not None
        alive = np.ones(rows, bool)
        return search.View(
            np.broadcast_to(words, (rows, 1)), alive, rows, 64, mih.MultiIndex(layout)
        )

    one_m, ten_m = view(1_000_000), view(10_000_000)
    assert search._probing_dearer(one_m, search._start_radius(one_m, 100))
    assert not search._probing_dearer(ten_m, search._start_radius(ten_m, 100))
