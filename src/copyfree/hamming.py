"""Exact Hamming search over packed codes, with deterministic ordering so that sharded
and single-node answers are identical. Used by the index and by evaluation.

The scans here are the brute-force side of the index. `within_radius` and `k_nearest`
run the fused C loop of copyfree._scan (built by setup.py; ~2x faster than numpy, at
the memory-bandwidth floor once the codes are out of cache) when it is built, and
otherwise xor + np.bitwise_count over blocks of rows small enough that the
temporaries stay in L2. The index's multi-index hash tables (copyfree_index.mih) beat
both at large N for small radii; the scans win for small N and large radii.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

try:  # the fused C scan; absent when the package was built without a C compiler
    from copyfree import _scan
except ImportError:  # pragma: no cover - depends on the build
    _scan = None

# Which scan within_radius and k_nearest run: "c" when the extension is built, else
# "numpy". Tests set it to run both against brute force; benchmarks report it.
SCAN_KERNEL = "c" if _scan is not None else "numpy"


def native():  # noqa: ANN201 - the extension module, untyped
    """copyfree._scan while the C kernels are in use (SCAN_KERNEL == "c"), else None:
    callers of its other loops (the index's table build and id hashing) keep a numpy
    path for None, so the same switch runs both in tests."""
    return _scan if SCAN_KERNEL == "c" else None


# First output capacity of a C scan; a larger answer costs a second pass.
_FIRST_CAPACITY = 4096

# Rows per block: keeps the xor/popcount temporaries inside L2 cache.
_BLOCK_ROWS = 65_536


def distances(db: NDArray[np.uint64], query: NDArray[np.uint64]) -> NDArray[np.int32]:
    """(n, W) uint64 codes vs (W,) uint64 query -> (n,) int32 Hamming distances."""
    n = db.shape[0]
    out = np.empty(n, dtype=np.int32)
    for start in range(0, n, _BLOCK_ROWS):
        block = db[start : start + _BLOCK_ROWS]
        counts = np.bitwise_count(block ^ query)
        out[start : start + len(block)] = counts.sum(axis=1, dtype=np.int32)
    return out


def small_distances(
    db: NDArray[np.uint64], query: NDArray[np.uint64]
) -> NDArray[np.uint8]:
    """Like distances() but uint8 (codes of at most 255 bits): a quarter of the
    memory traffic, which is what a scan of millions of rows is bound by."""
    n, words = db.shape
    out = np.empty(n, dtype=np.uint8)
    xor = np.empty((min(n, _BLOCK_ROWS), words), dtype=np.uint64)
    counts = np.empty((min(n, _BLOCK_ROWS), words), dtype=np.uint8)
    for start in range(0, n, _BLOCK_ROWS):
        block = db[start : start + _BLOCK_ROWS]
        k = len(block)
        np.bitwise_xor(block, query, out=xor[:k])
        np.bitwise_count(xor[:k], out=counts[:k])
        if words == 1:
            out[start : start + k] = counts[:k, 0]
        else:
            np.sum(counts[:k], axis=1, dtype=np.uint8, out=out[start : start + k])
    return out


def _c_ready(db: NDArray[np.uint64]) -> bool:
    return (
        SCAN_KERNEL == "c"
        and db.dtype == np.uint64
        and db.flags.c_contiguous
        and 1 <= db.shape[1] <= 4
    )


def bucket_distances(
    entries: NDArray[np.int64],
    len_bits: int,
    slot_codes: NDArray[np.uint64],
    query_word: int,
    limit: int,
) -> tuple[NDArray[np.int64], NDArray[np.int32]]:
    """(slot, distance) of every slot within limit in the buckets named by
    `entries` (start << len_bits | length, into the one-word `slot_codes`), bucket
    by bucket: multi-index hashing's verification in one C pass. C kernel only:
    the caller keeps its numpy path for SCAN_KERNEL == "numpy"."""
    assert _scan is not None, "copyfree._scan is not built"
    # room for every slot: one pass, and untouched pages of np.empty cost nothing
    cap = int((entries & ((1 << len_bits) - 1)).sum())
    index, dist = np.empty(cap, np.int64), np.empty(cap, np.int32)
    total = _scan.buckets(entries, len_bits, slot_codes, query_word, limit, index, dist)
    return index[:total], dist[:total]


def within_radius(
    db: NDArray[np.uint64],
    query: NDArray[np.uint64],
    radius: int,
    alive: NDArray[np.bool_] | None = None,
) -> tuple[NDArray[np.int64], NDArray[np.int32]]:
    """Rows with distance <= radius (inclusive): (row numbers, distances), by row;
    rows where `alive` is False are skipped."""
    if radius < 0 or db.shape[0] == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int32)
    if _c_ready(db):
        q = np.ascontiguousarray(query, np.uint64)
        cap = min(db.shape[0], _FIRST_CAPACITY)
        while True:
            rows, dist = np.empty(cap, np.int64), np.empty(cap, np.int32)
            total = _scan.within(db, q, radius, alive, rows, dist)
            if total <= cap:
                return rows[:total], dist[:total]
            cap = total
    rows, d = _numpy_within_radius(db, query, radius)
    if alive is not None:
        keep = alive[rows]
        rows, d = rows[keep], d[keep]
    return rows, d


def _numpy_within_radius(
    db: NDArray[np.uint64], query: NDArray[np.uint64], radius: int
) -> tuple[NDArray[np.int64], NDArray[np.int32]]:
    if db.shape[1] * 64 > 255:
        d = distances(db, query)
        rows = np.flatnonzero(d <= radius)
        return rows, d[rows]
    rows_parts: list[NDArray[np.int64]] = []
    dist_parts: list[NDArray[np.uint8]] = []
    n, words = db.shape
    xor = np.empty((min(n, _BLOCK_ROWS), words), dtype=np.uint64)
    counts = np.empty((min(n, _BLOCK_ROWS), words), dtype=np.uint8)
    for start in range(0, n, _BLOCK_ROWS):
        block = db[start : start + _BLOCK_ROWS]
        k = len(block)
        np.bitwise_xor(block, query, out=xor[:k])
        np.bitwise_count(xor[:k], out=counts[:k])
        d = counts[:k, 0] if words == 1 else counts[:k].sum(axis=1, dtype=np.uint8)
        hit = np.flatnonzero(d <= radius)
        if hit.size:
            rows_parts.append(hit + start)
            dist_parts.append(d[hit])
    if not rows_parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int32)
    return np.concatenate(rows_parts), np.concatenate(dist_parts).astype(np.int32)


def k_nearest(
    db: NDArray[np.uint64],
    query: NDArray[np.uint64],
    k: int,
    alive: NDArray[np.bool_] | None = None,
) -> tuple[NDArray[np.int64], NDArray[np.int32]]:
    """Every row whose distance is <= the k-th smallest (ties included), with the
    distances, by row; rows where `alive` is False are skipped. One blocked pass:
    each block keeps the rows within the best threshold known so far, and the
    threshold tightens as candidates accumulate (a streaming top-k), so no
    N-sized distance array is written or re-read."""
    n, words = db.shape
    if k <= 0 or n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int32)
    if _c_ready(db):
        q = np.ascontiguousarray(query, np.uint64)
        cap = min(n, max(_FIRST_CAPACITY, 8 * k))
        while True:
            rows, dist = np.empty(cap, np.int64), np.empty(cap, np.int32)
            held, limit = _scan.nearest(db, q, k, alive, rows, dist)
            if held >= 0:
                keep = np.flatnonzero(dist[:held] <= limit)
                return rows[keep], dist[keep]
            cap = n  # more rows tied within the bound than the buffer held
    bits = 64 * words
    small = bits <= 255
    limit = bits  # distances above it cannot be among the k nearest any more
    rows_parts: list[NDArray[np.int64]] = []
    dist_parts: list[NDArray[np.integer]] = []
    held = 0
    size = min(n, _BLOCK_ROWS)
    xor = np.empty((size, words), np.uint64)
    counts = np.empty((size, words), np.uint8)
    for start in range(0, n, _BLOCK_ROWS):
        block = db[start : start + _BLOCK_ROWS]
        m = len(block)
        np.bitwise_xor(block, query, out=xor[:m])
        np.bitwise_count(xor[:m], out=counts[:m])
        if words == 1:
            d: NDArray[np.integer] = counts[:m].reshape(m)
        else:
            d = counts[:m].sum(axis=1, dtype=np.uint8 if small else np.int32)
        if alive is not None:
            d = np.where(alive[start : start + m], d, bits + 1)
        if limit == bits and m >= k:
            # the k-th smallest of any k or more rows bounds the k-th of all rows
            limit = min(limit, kth_smallest(d, k, bits))
        hit = np.flatnonzero(d <= limit)
        if hit.size:
            rows_parts.append(hit + start)
            dist_parts.append(d[hit])  # a copy: the buffers are reused
            held += hit.size
        if held > 8 * k:  # tighten: keep only what can still make the top k
            rows = np.concatenate(rows_parts)
            dist = np.concatenate(dist_parts)
            limit = kth_smallest(dist, k, bits)
            keep = np.flatnonzero(dist <= limit)
            rows_parts, dist_parts, held = [rows[keep]], [dist[keep]], keep.size
    if not rows_parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int32)
    rows = np.concatenate(rows_parts)
    dist = np.concatenate(dist_parts)
    limit = kth_smallest(dist, k, bits)
    keep = np.flatnonzero(dist <= min(limit, bits))
    return rows[keep].astype(np.int64), dist[keep].astype(np.int32)


def kth_smallest(d: NDArray[np.integer], k: int, max_value: int) -> int:
    """The k-th smallest value (1-based) among the values of d that are <= max_value
    (small non-negative integers), by counting instead of sorting; max_value + 1 if
    fewer than k are. Large arrays: a binary search of count_nonzero passes (~0.1 ms
    per million), ~20x faster than a histogram, which converts to intp first."""
    if k <= 0:
        return -1
    d = d.ravel()
    if d.size <= 65_536:
        hist = np.bincount(d, minlength=max_value + 1)[: max_value + 1]
        reached = np.flatnonzero(np.cumsum(hist) >= k)
        return int(reached[0]) if reached.size else max_value + 1
    lo, hi = 0, max_value + 1  # answer in [lo, hi]; hi means "fewer than k"
    while lo < hi:
        mid = (lo + hi) // 2
        if np.count_nonzero(d <= mid) >= k:
            hi = mid
        else:
            lo = mid + 1
    return lo


def order_by_distance_then_key(
    dist: NDArray[np.integer], keys: list[str]
) -> NDArray[np.int64]:
    """Permutation sorting by (distance ascending, key ascending)."""
    return np.asarray(
        sorted(range(len(keys)), key=lambda i: (int(dist[i]), keys[i])), dtype=np.int64
    )


def nearest_rows(d: NDArray[np.int32], k: int) -> NDArray[np.int64]:
    """Every row that can be among the k nearest (all rows tied with the k-th)."""
    if k <= 0 or d.size == 0:
        return np.zeros(0, dtype=np.int64)
    if k >= d.size:
        return np.arange(d.size, dtype=np.int64)
    kth = np.partition(d, k - 1)[k - 1]
    return np.flatnonzero(d <= kth)
