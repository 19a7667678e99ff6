"""The fused C scan (copyfree._scan) and the numpy scans against brute force: every
word count, distances exactly at the radius, ties at the k-th distance, tombstones,
answers larger than the first output buffer, and threads scanning at once."""

from __future__ import annotations

import shutil
import sysconfig
import threading

import numpy as np
import pytest

from copyfree import hamming

KERNELS = ["c", "numpy"]


@pytest.fixture(params=KERNELS)
def kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "c" and hamming._scan is None:
        pytest.skip("copyfree._scan is not built (no C compiler at install time)")
    monkeypatch.setattr(hamming, "SCAN_KERNEL", request.param)
    return request.param


def test_extension_is_built_where_a_compiler_is() -> None:
    """`pip install -e .` compiles it whenever a C compiler exists; a silent fallback
    to numpy would halve the scan speed without anyone noticing."""
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        pytest.skip(f"no C compiler ({cc}): the numpy scans are the only ones")
    assert hamming._scan is not None, "reinstall: pip install -e . (setup.py)"


def codes_near(
    query: np.ndarray, n: int, rng: np.random.Generator, max_flips: int
) -> np.ndarray:
    """(n, W) codes at 0..max_flips bits from `query`, each distance several times."""
    words = query.size
    bits = np.unpackbits(query.view(np.uint8))
    out = np.empty((n, words), np.uint64)
    for i in range(n):
        b = bits.copy()
        b[rng.choice(b.size, int(rng.integers(0, max_flips + 1)), replace=False)] ^= 1
        out[i] = np.packbits(b).view(np.uint64)
    return out


def brute(db: np.ndarray, query: np.ndarray) -> np.ndarray:
    return np.bitwise_count(db ^ query).sum(axis=1).astype(np.int64)


@pytest.mark.parametrize("words", [1, 2, 3, 4])
def test_within_radius_equals_brute_force(
    kernel: str, words: int, rng: np.random.Generator
) -> None:
    query = rng.integers(0, 2**63, words, dtype=np.uint64)
    db = np.concatenate(
        [
            codes_near(query, 400, rng, 20),
            rng.integers(0, 2**63, (600, words), dtype=np.uint64),
        ]
    )
    rng.shuffle(db)
    alive = rng.random(db.shape[0]) > 0.2
    d = brute(db, query)
    for radius in (-1, 0, 5, 12, 20, 64 * words):
        for mask in (None, alive):
            rows, got = hamming.within_radius(db, query, radius, mask)
            want = np.flatnonzero((d <= radius) & (True if mask is None else mask))
            assert rows.tolist() == want.tolist()
            assert got.tolist() == d[want].tolist()


@pytest.mark.parametrize("words", [1, 2, 4])
def test_k_nearest_keeps_every_tie(
    kernel: str, words: int, rng: np.random.Generator
) -> None:
    query = rng.integers(0, 2**63, words, dtype=np.uint64)
    db = np.concatenate(
        [
            codes_near(query, 300, rng, 6),  # many rows per distance: ties at k
            rng.integers(0, 2**63, (5000, words), dtype=np.uint64),
        ]
    )
    rng.shuffle(db)
    alive = rng.random(db.shape[0]) > 0.3
    d = brute(db, query)
    for k in (1, 7, 50, 100, 299, db.shape[0], db.shape[0] + 5):
        for mask in (None, alive):
            live = d if mask is None else np.where(mask, d, 10**6)
            n_live = int((live < 10**6).sum())
            kth = np.sort(live)[min(k, n_live) - 1]
            want = np.flatnonzero(live <= kth)
            rows, got = hamming.k_nearest(db, query, k, mask)
            assert rows.tolist() == want.tolist(), (k, mask is None)
            assert got.tolist() == d[want].tolist()


def test_answers_larger_than_the_first_buffer(
    kernel: str, rng: np.random.Generator
) -> None:
    """20,000 identical codes: every one is tied at the k-th distance and within
    the radius, more than the first output buffer holds."""
    query = rng.integers(0, 2**63, 1, dtype=np.uint64)
    db = np.concatenate(
        [
            np.repeat(query[None] ^ np.uint64(0b111), 20_000, axis=0),
            rng.integers(0, 2**63, (30_000, 1), dtype=np.uint64),
        ]
    )
    rows, d = hamming.k_nearest(db, query, 10)
    assert rows.tolist() == list(range(20_000)) and set(d.tolist()) == {3}
    rows, d = hamming.within_radius(db, query, 3)
    assert rows.tolist() == list(range(20_000))


def test_non_contiguous_codes_take_the_numpy_path(rng: np.random.Generator) -> None:
    db = rng.integers(0, 2**63, (1000, 2), dtype=np.uint64)
    query = db[3, :1].copy()
    column = db[:, :1]  # a strided view: not a buffer the C scan can read
    rows, d = hamming.k_nearest(column, query, 1)
    assert rows.tolist() == [3] and d.tolist() == [0]


def test_scans_run_in_parallel_threads(kernel: str, rng: np.random.Generator) -> None:
    """Threads share the codes; each gets its own exact answer (the C scan releases
    the GIL, so they really overlap)."""
    db = rng.integers(0, 2**63, (200_000, 1), dtype=np.uint64)
    queries = rng.integers(0, 2**63, (8, 1), dtype=np.uint64)
    results: dict[int, tuple[list[int], list[int]]] = {}

    def work(i: int) -> None:
        rows, d = hamming.k_nearest(db, queries[i], 20)
        results[i] = (rows.tolist(), d.tolist())

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(8):
        d = brute(db, queries[i])
        kth = np.sort(d)[19]
        want = np.flatnonzero(d <= kth)
        assert results[i] == (want.tolist(), d[want].tolist())


def test_c_scan_rejects_malformed_buffers() -> None:
    if hamming._scan is None:
        pytest.skip("copyfree._scan is not built")
    db = np.zeros((10, 5), np.uint64)  # 5 words: more than 256 bits
    out_rows, out_d = np.empty(10, np.int64), np.empty(10, np.int32)
    with pytest.raises(ValueError, match="1 to 4 uint64 words"):
        hamming._scan.within(db, db[0], 3, None, out_rows, out_d)
    with pytest.raises(ValueError, match="alive mask shorter"):
        hamming._scan.nearest(db[:, :1].copy(), db[0, :1], 3, b"\x01", out_rows, out_d)
    with pytest.raises(ValueError, match="k must be at least 1"):
        hamming._scan.nearest(db[:, :1].copy(), db[0, :1], 0, None, out_rows, out_d)
