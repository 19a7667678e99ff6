"""Exact Hamming searches over one collection snapshot, and the planner that picks
multi-index hashing or a blocked scan per query from N, the radius and the layout.

Every function returns *all* live rows that qualify (every row tied at the k-th
distance, for the nearest-k searches), so the caller's ordering by finer keys and ids
is exact; results equal a brute-force scan (tests/unit/index check that).

Cost model (nanoseconds, measured on the 2-core dev VM): a probe pass costs PASS_NS of
numpy call overhead, PROBE_NS per bucket read (a cache miss or two) and CANDIDATE_NS
per row verified; a scan costs SCAN_PASS_NS plus SCAN_NS per row and word, by scan
kernel (copyfree.hamming.SCAN_KERNEL: the fused C loop or numpy's three passes).
Expected candidates assume uniform bucket loads. The model only has to rank the two
methods; the figures are fits to probe and scan timings at 1M and 10M rows
(benchmarks/bench_index.py data).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from copyfree import hamming
from copyfree_index.mih import (
    LEN_BITS,
    LEN_MASK,
    Candidates,
    MultiIndex,
    ball_size,
    probe_plan,
)
from copyfree_index.ragged import concat_ranges

PASS_NS = 70_000.0  # incl. gathering the hits (dedup by row)
PROBE_NS = 12.0
CANDIDATE_NS = 8.0  # incl. the per-candidate work after the probe (dedup, bounds)
BOUND_NS = 80_000.0  # a k-th distance bound over the candidates (nearest-k)
# Nearest-k pass schedule, per table layout (measured on clustered keys at 1M and 10M
# rows): the first pass's radius at most, and how many bits a later pass may widen
# the covered radius by. Denser collections (wide groups) find a near copy's
# neighbours sooner.
START_RADIUS_CAP = {"narrow": 12, "wide": 8}
MAX_STEP = {"narrow": 64, "wide": 4}
SCAN_PASS_NS = 20_000.0
# per row and word, radius search and nearest-k (streaming top-k), by scan kernel
SCAN_NS = {"c": 0.62, "numpy": 1.5}
SCAN_NEAREST_NS = {"c": 0.62, "numpy": 1.6}
# Tests (and the benchmark) pin the method to exercise both paths on small data.
FORCE_METHOD: str | None = None  # "mih" | "scan" | None (the cost model decides)
_EMPTY_ROWS = np.zeros(0, np.int64)
_EMPTY_D = np.zeros(0, np.int32)

Hits = tuple[NDArray[np.int64], NDArray[np.int32]]  # (rows, distances)


@dataclass(frozen=True)
class View:
    """What the searches read from a collection snapshot (never written)."""

    words: NDArray[np.uint64]  # (n, W) codes of rows 0..n-1
    alive: NDArray[np.bool_]  # (n,)
    live: int
    code_bits: int
    tables: MultiIndex | None  # may index rows >= n (filtered)

    @property
    def rows(self) -> int:
        return int(self.alive.shape[0])


# ------------------------------------------------------------------- planning


def scan_cost(view: View, nearest: bool = False) -> float:
    per_row = (SCAN_NEAREST_NS if nearest else SCAN_NS)[hamming.SCAN_KERNEL]
    return SCAN_PASS_NS + per_row * view.rows * view.words.shape[1]


def probe_cost(view: View, lo: tuple[int, ...], hi: tuple[int, ...]) -> float:
    assert view.tables is not None
    layout = view.tables.layout
    probes = layout.probes(hi) - layout.probes(lo)
    cands = layout.expected_candidates(hi, view.rows) - layout.expected_candidates(
        lo, view.rows
    )
    return PASS_NS + PROBE_NS * probes + CANDIDATE_NS * cands


def method_for_radius(view: View, radius: int) -> str:
    """Which method a radius search uses: "mih" or "scan"."""
    if view.tables is None or view.rows == 0:
        return "scan"
    if FORCE_METHOD is not None:
        return FORCE_METHOD
    layout = view.tables.layout
    none = (-1,) * layout.m
    cost = probe_cost(view, none, layout.split(radius))
    return "mih" if cost < scan_cost(view) else "scan"


# --------------------------------------------------------------- radius search


def within(view: View, query: NDArray[np.uint64], radius: int) -> Hits:
    """Live rows with distance <= radius, each once, ascending by row."""
    if view.rows == 0 or radius < 0:
        return _EMPTY_ROWS, _EMPTY_D
    if method_for_radius(view, radius) == "scan":
        alive = view.alive if view.live < view.rows else None
        return hamming.within_radius(view.words, query, radius, alive)
    state = _Probing(view, query)
    state.extend(state.layout.split(radius), limit=radius)
    return state.hits(radius)


class _Probing:
    """Candidates from successive probe passes of one query (rings never repeat)."""

    def __init__(self, view: View, query: NDArray[np.uint64]) -> None:
        assert view.tables is not None
        self.view, self.query = view, query
        self.tables = view.tables
        self.layout = view.tables.layout
        self.lo: tuple[int, ...] = (-1,) * self.layout.m
        self.passes: list[Candidates] = []
        self._hist: dict[int, NDArray[np.int64]] = {}

    @property
    def covered(self) -> int:
        return self.layout.covered(self.lo) if max(self.lo) >= 0 else -1

    def extend(self, hi: tuple[int, ...], limit: int | None = None) -> None:
        """Probe the rings up to `hi`; candidates farther than `limit` may be left
        out (a radius search that will not go on to nearest-k)."""
        hi = tuple(max(a, b) for a, b in zip(self.lo, hi, strict=True))
        if hi != self.lo:
            found = self.tables.probe(self.query, self.lo, hi, self.view.words, limit)
            self.passes.append(found)
        self.lo = hi

    def within(self, limit: int) -> tuple[NDArray[np.int32], NDArray[np.integer]]:
        """(rows, distances) of the candidates within limit (duplicates, dead rows
        and rows past the snapshot included); rows are gathered only for these."""
        rows, dist = [], []
        for found in self.passes:
            sel = np.flatnonzero(found.dist <= limit)
            rows.append(found.rows(sel))
            dist.append(found.dist[sel])
        if len(rows) == 1:
            return rows[0], dist[0]
        if not rows:
            return np.zeros(0, np.int32), np.zeros(0, np.int32)
        return np.concatenate(rows), np.concatenate(dist)

    def hits(self, limit: int) -> Hits:
        """Live rows with distance <= limit among the candidates, each once."""
        return self._live_unique(*self.within(limit))

    def _live_unique(self, rows: NDArray[np.int32], d: NDArray[np.integer]) -> Hits:
        if self.tables.rows > self.view.rows:  # rows appended after this snapshot
            inside = rows < self.view.rows
            rows, d = rows[inside], d[inside]
        if self.view.live < self.view.rows:  # tombstones
            keep = self.view.alive[rows]
            rows, d = rows[keep], d[keep]
        # a row shows up once per group that found it: sort and keep the first
        order = np.argsort(rows)
        rows, d = rows[order], d[order]
        first = np.ones(rows.size, bool)
        np.not_equal(rows[1:], rows[:-1], out=first[1:])
        return rows[first].astype(np.int64), d[first].astype(np.int32)

    def kth_bound(self, k: int) -> int:
        """The k-th smallest distance among the distinct live candidates (an upper
        bound on the true k-th nearest distance); code_bits + 1 if there are fewer
        than k. Only the closest few candidates are deduplicated: per-pass
        distance histograms say which."""
        bits = self.view.code_bits
        if not self.passes:
            return bits + 1
        hist = self._hist.get(len(self.passes))
        if hist is None:
            hist = sum(
                np.bincount(found.dist, minlength=bits + 1)[: bits + 1]
                for found in self.passes
            )
            self._hist[len(self.passes)] = hist
        # a row appears at most m times: this prefix holds >= k distinct rows unless
        # many are dead, in which case every candidate is looked at
        reach = np.flatnonzero(np.cumsum(hist) >= 2 * k * self.layout.m)
        t0 = int(reach[0]) if reach.size else bits
        for limit in (t0, bits):
            _, dist = self.hits(limit)
            if dist.size >= k:
                return hamming.kth_smallest(dist, k, bits)
            if limit >= bits:
                break
        return bits + 1


# --------------------------------------------------------------------- nearest


def nearest(view: View, query: NDArray[np.uint64], k: int) -> Hits:
    """Every live row with distance <= the k-th smallest live distance."""
    if k <= 0 or view.live == 0:
        return _EMPTY_ROWS, _EMPTY_D
    if view.tables is None or FORCE_METHOD == "scan":
        return _scan_nearest(view, query, k)
    if view.tables.layout.full_code:
        return _walk(view, query, k)
    start = _start_radius(view, k)
    if FORCE_METHOD is None and _probing_dearer(view, start):
        return _scan_nearest(view, query, k)
    state = _Probing(view, query)
    return _continue_nearest(state, k, start)


def nearest_exactly(
    view: View, query: NDArray[np.uint64], k: int
) -> tuple[NDArray[np.integer], NDArray[np.integer]]:
    """Exactly min(k, live) rows, the k smallest by (distance, row number), ordered:
    the same task as faiss's search (which breaks ties by index order too)."""
    rows, d = nearest(view, query, k)
    if d.size and d[0] == d[-1] and d.min() == d.max():
        # one distance (a bucket of 16-bit codes): order by row alone
        if rows.size > k:
            rows = np.partition(rows, k - 1)[:k]
        rows.sort()
        return rows, d[: rows.size]
    key = d.astype(np.int64) << 32 | rows.astype(np.int64)
    if key.size > k:
        key = key[np.argpartition(key, k - 1)[:k]]
    key.sort()
    return key & 0xFFFFFFFF, key >> 32


def detect_search(
    view: View, query: NDArray[np.uint64], radius: int, fallback_k: int
) -> tuple[Hits, Hits]:
    """(stage-1 hits within radius, nearest fallback_k when there are none)."""
    empty = (_EMPTY_ROWS, _EMPTY_D)
    if view.rows == 0:
        return empty, empty
    if method_for_radius(view, radius) == "scan":
        hits = within(view, query, radius)
        if hits[0].size or fallback_k <= 0 or view.live == 0:
            return hits, empty
        return empty, _scan_nearest(view, query, fallback_k)
    state = _Probing(view, query)
    state.extend(state.layout.split(radius))
    hits = state.hits(radius)
    if hits[0].size or fallback_k <= 0 or view.live == 0:
        return hits, empty
    return empty, _continue_nearest(state, fallback_k, radius)


def _start_radius(view: View, k: int) -> int:
    """A first radius that is cheap yet likely to hold k rows: uniform data has
    rows * P(Binomial(bits, 1/2) <= r) rows within r of a query; capped at 8 (a
    few hundred buckets), enough to bound the k-th distance of a near copy and to
    see that a far query is better scanned."""
    bits, rows = view.code_bits, view.rows
    for r in range(bits + 1):
        if rows * ball_size(bits, r) / 2.0**bits >= k:
            return min(r, START_RADIUS_CAP[_kind(view)])
    return START_RADIUS_CAP[_kind(view)]


def _probing_dearer(view: View, start: int) -> bool:
    """Whether probing is expected to cost more than a scan before it starts. The
    k-th distance of even a near copy usually lies a ring per group beyond the
    start radius (clustered keys at 1M and 10M rows), so that is the radius priced;
    a far query's lies further still and falls back to a scan after a pass."""
    assert view.tables is not None
    layout = view.tables.layout
    ahead = layout.split(min(view.code_bits, start + layout.m))
    none = (-1,) * layout.m
    return probe_cost(view, none, ahead) > scan_cost(view, nearest=True)


def _kind(view: View) -> str:
    tables = view.tables
    wide = tables is not None and tables.layout.groups[0].width > 16
    return "wide" if wide else "narrow"


def _continue_nearest(state: _Probing, k: int, radius: int) -> Hits:
    """Probe until the k-th smallest distance seen is covered; give up for a scan
    as soon as the probes still ahead would cost more than scanning."""
    view, layout = state.view, state.layout
    bits = view.code_bits
    target = radius
    while True:
        hi = layout.split(target)
        if FORCE_METHOD == "scan" or (
            FORCE_METHOD is None
            and probe_cost(view, state.lo, hi) > scan_cost(view, nearest=True)
        ):
            return _scan_nearest(view, state.query, k)
        state.extend(hi)
        covered = state.covered
        bound = state.kth_bound(k)
        if bound <= covered:
            return state.hits(bound)
        if covered >= bits:  # everything seen: fewer than k live rows
            return state.hits(bits)
        if bound > bits:  # fewer than k candidates yet: widen every group by one
            target = covered + layout.m
            continue
        # Toward the bound, a few bits per pass at most: a bound from few
        # candidates is loose (a far query's first one often is), a tighter one
        # follows from the next pass; widening a bit at a time instead pays a bound
        # computation per bit, as dear as a pass (measured slower).
        rest = probe_cost(view, state.lo, layout.split(bound)) + BOUND_NS
        if FORCE_METHOD is None and rest > scan_cost(view, nearest=True):
            return _scan_nearest(view, state.query, k)
        target = min(bound, covered + MAX_STEP[_kind(view)])


def _walk(view: View, query: NDArray[np.uint64], k: int) -> Hits:
    """Full-code table (16-bit codes): the bucket of a code is its ring, so one read
    of the bucket lengths of a few rings tells which rings hold the k nearest; only
    those buckets' rows are gathered, and nothing needs verifying."""
    tables = view.tables
    assert tables is not None
    # Rings 0 and 1 first: at millions of rows they hold the k nearest of most
    # queries (ring 0 alone for 70 % of the benchmark's at 10M, one entry read),
    # and 17 entry reads answer them without planning. The row count is checked
    # after the entries: a writer publishes it before them.
    start, length, rows_s = tables.own_bucket(query)
    clean = tables.rows == view.rows and view.live == view.rows
    if clean and length >= k:
        return rows_s[start : start + length].astype(np.int64), np.zeros(
            length, np.int32
        )
    if clean:
        entries, pops, rows_s = tables.near_buckets(query)
        clean = tables.rows == view.rows
        lengths = entries & LEN_MASK
        if clean and int(lengths.sum()) >= k:
            sel = np.flatnonzero(lengths)
            rows = _bucket_rows(rows_s, entries, lengths, sel).astype(np.int64)
            return rows, np.repeat(pops[sel].astype(np.int32), lengths[sel])
    layout = tables.layout
    width = layout.groups[0].width
    r = 0  # rings to look at: enough for ~4k rows if the codes were uniform
    while r < width and tables.rows * ball_size(width, r) / 2.0**width < 4 * k:
        r += 1
    t_min = 0  # raised when dead rows (or rows past the snapshot) leave us short
    while True:
        plan = probe_plan(layout, (-1,), (r,))
        entry, rows_s, _ = tables.buckets(query, plan)
        length = entry & LEN_MASK
        per_ring = np.bincount(plan.pops, weights=length, minlength=r + 1)
        enough = np.flatnonzero(np.cumsum(per_ring) >= k)
        if not enough.size and r < width:
            r = min(width, r + 2)  # not k rows within r even counting dead ones
            continue
        t = max(int(enough[0]) if enough.size else r, t_min)
        sub = plan.within(t)
        sel = sub[length[sub] > 0]
        rows = _bucket_rows(rows_s, entry, length, sel)
        d = np.repeat(plan.pops[sel], length[sel])
        dropped = False
        if tables.rows > view.rows:  # rows appended after this snapshot
            keep = rows < view.rows
            if not keep.all():
                rows, d, dropped = rows[keep], d[keep], True
        if view.live < view.rows:  # tombstones
            keep = view.alive[rows]
            if not keep.all():
                rows, d, dropped = rows[keep], d[keep], True
        if not dropped:
            # the counts were exact: ring t holds the k-th row, and every row read
            # is within it
            return rows, d
        if rows.size >= k or t >= width:
            break
        t_min = t + 1  # one ring further
        r = max(r, t_min)
    kth = hamming.kth_smallest(d, k, width)
    sel = np.flatnonzero(d <= kth)
    return rows[sel], d[sel]


def _bucket_rows(
    rows_s: NDArray[np.int32],
    entry: NDArray[np.int64],
    length: NDArray[np.int64],
    sel: NDArray[np.intp],
) -> NDArray[np.int32]:
    """The slot rows of buckets entry[sel] (non-empty), bucket by bucket."""
    if sel.size <= 32:  # a few buckets: slices beat building an index
        starts = (entry[sel] >> LEN_BITS).tolist()
        sizes = length[sel].tolist()
        return np.concatenate(
            [rows_s[a : a + b] for a, b in zip(starts, sizes, strict=True)]
            or [rows_s[:0]]
        )
    return rows_s[concat_ranges(entry[sel] >> LEN_BITS, length[sel])]


# ------------------------------------------------------------------------ scans


def _scan_nearest(view: View, query: NDArray[np.uint64], k: int) -> Hits:
    alive = view.alive if view.live < view.rows else None
    return hamming.k_nearest(view.words, query, k, alive)
