"""Exact Hamming search over packed codes, with deterministic ordering so that sharded
and single-node answers are identical. Used by the index and by evaluation."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

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


def within_radius(
    db: NDArray[np.uint64], query: NDArray[np.uint64], radius: int
) -> tuple[NDArray[np.int64], NDArray[np.int32]]:
    """Rows with distance <= radius (inclusive): (row numbers, distances)."""
    d = distances(db, query)
    rows = np.flatnonzero(d <= radius)
    return rows, d[rows]


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
