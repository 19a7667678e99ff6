"""Multi-index hash tables over packed codes (seed 001 §3.3.2 Algorithm 1, DESIGN §3).

A code is split into m groups of bits (16 each by default; 22/21/21 for 64-bit codes
at >= 4M rows, where fewer, wider groups cut the candidates ~4x). Each group has a
table of 2^width buckets, bucket = the rows whose group bits equal the bucket number.
An item within radius r of the query has at least one group i within sub-radius r_i of
the query's group whenever sum(r_i + 1) = r + 1 (pigeonhole), so probing every bucket
within r_i of group i and verifying the full distance finds every item within r,
exactly. With one group covering the whole code (16-bit retrieval codes) the bucket
*is* the code: walking the buckets in Hamming-ball order yields exact distances with
no verification at all.

Layout, per table (all groups share the arrays):
- entries: int64 per bucket = start << LEN_BITS | length, one word so a reader never
  sees a start from one update and a length from another;
- caps: int32 per bucket, writer only;
- slots: (rows int32, codes uint64 | None) in one tuple. For one-word codes every slot
  also holds the item's code, so verifying a bucket reads contiguous memory instead of
  one cache miss per candidate (measured 4x on this VM).

Appends never rebuild: a bucket with room takes the new rows in place; a full one is
copied to the end of the slot arrays with 50% headroom (the old copy becomes garbage,
reclaimed by `compacted()` once it exceeds a third of the slots). Deleted rows stay
in the buckets (the search filters them with the alive mask) until the collection is
compacted.

Concurrency (one writer, any number of lock-free readers): a reader reads `entries`
*before* `slots` and `rows`; a writer writes slot contents first, publishes grown
slot arrays and the new row count next, and updates `entries` last. Regions named by
an entry are never overwritten, so every reader sees each row < its snapshot's row
count exactly where an entry it read says, and knows when rows past its snapshot may
be present (`rows` > its count), which it then drops.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from copyfree import hamming
from copyfree_index.ragged import concat_ranges

LEN_BITS = 31
LEN_MASK = (1 << LEN_BITS) - 1
# Below this many rows a blocked scan beats probing (and tables would cost more
# memory per item than the items): no tables.
MIN_ROWS = 32_768
# Wider groups from this many rows (64-bit codes): 3 x 2^21-ish buckets stay under
# ~25 B per item here and shrink with N.
WIDE_ROWS = 4_000_000
WIDE_BITS = 22


@dataclass(frozen=True)
class Group:
    word: int  # which uint64 word of the code
    shift: int  # lowest bit of the group inside the word
    width: int  # bits; the group's table has 2^width buckets


@dataclass(frozen=True)
class Layout:
    code_bits: int
    groups: tuple[Group, ...]

    @property
    def m(self) -> int:
        return len(self.groups)

    @property
    def full_code(self) -> bool:
        """One group holds every bit: a bucket's rows are at the probe's distance."""
        return self.m == 1 and self.groups[0].width == self.code_bits

    @property
    def store_codes(self) -> bool:
        """Slots carry the (one-word) code for verification."""
        return not self.full_code and self.code_bits <= 64

    @functools.cached_property
    def bases(self) -> tuple[int, ...]:
        out, base = [], 0
        for g in self.groups:
            out.append(base)
            base += 1 << g.width
        return tuple(out)

    @property
    def buckets(self) -> int:
        return sum(1 << g.width for g in self.groups)

    def group_keys(self, words: NDArray[np.uint64]) -> NDArray[np.int64]:
        """(n, W) codes -> (n, m) bucket numbers (not offset by the bases)."""
        out = np.empty((words.shape[0], self.m), np.int64)
        for i in range(self.m):
            out[:, i] = self.group_key(words, i)
        return out

    def group_key(self, words: NDArray[np.uint64], i: int) -> NDArray[np.int64]:
        """(n, W) codes -> (n,) bucket numbers in group i."""
        g = self.groups[i]
        col = words[:, g.word] >> np.uint64(g.shift)
        return (col & np.uint64((1 << g.width) - 1)).astype(np.int64)

    def split(self, radius: int) -> tuple[int, ...]:
        """The tightest exact sub-radii: sum(r_i + 1) = radius + 1 (r_i = -1: group
        not probed), extra units to the widest groups (fewest rows per bucket)."""
        base, extra = divmod(radius + 1, self.m)
        radii = [base - 1] * self.m
        widest = sorted(range(self.m), key=lambda i: -self.groups[i].width)
        for i in widest[:extra]:
            radii[i] += 1
        return tuple(min(r, g.width) for r, g in zip(radii, self.groups, strict=True))

    def covered(self, split: tuple[int, ...]) -> int:
        """The radius that probing `split` answers exactly."""
        if any(r >= g.width for r, g in zip(split, self.groups, strict=True)):
            return self.code_bits  # a whole group's table: every row was seen
        return sum(r + 1 for r in split) - 1

    def probes(self, split: tuple[int, ...]) -> int:
        return sum(
            ball_size(g.width, r) for g, r in zip(self.groups, split, strict=True)
        )

    def expected_candidates(self, split: tuple[int, ...], rows: int) -> float:
        """Rows seen when probing `split` if the group values were uniform."""
        return sum(
            rows * ball_size(g.width, r) / (1 << g.width)
            for g, r in zip(self.groups, split, strict=True)
        )


def choose_layout(code_bits: int, rows: int) -> Layout | None:
    """The groups for a collection of `rows` codes (None: too small for tables)."""
    if rows < MIN_ROWS:
        return None
    target = WIDE_BITS if rows >= WIDE_ROWS and code_bits >= 3 * 16 else 16
    groups: list[Group] = []
    for word in range((code_bits + 63) // 64):
        used = min(64, code_bits - 64 * word)
        # codes are packed bytes viewed as native words: the used bits are the low
        # ones on little-endian machines, the high ones on big-endian machines
        low = 0 if np.little_endian else 64 - used
        k = -(-used // target)
        widths = [used // k + (1 if i < used % k else 0) for i in range(k)]
        shift = low
        for w in widths:
            groups.append(Group(word, shift, w))
            shift += w
    return Layout(code_bits, tuple(groups))


# ------------------------------------------------------------------ probe masks


@functools.cache
def _rings(width: int, radius: int) -> tuple[NDArray[np.int64], ...]:
    """Ring j (j = 0..radius): every width-bit mask with exactly j bits set."""
    if radius == 0:
        return (np.zeros(1, np.int64),)
    prev = _rings(width, radius - 1)
    last = prev[-1]
    # extend each mask of the last ring by one bit above its highest set bit
    high = np.zeros(last.size, np.int64)
    nz = last > 0
    high[nz] = np.floor(np.log2(last[nz])).astype(np.int64) + 1
    bits = np.arange(width, dtype=np.int64)
    grid = last[:, None] | (np.int64(1) << bits)[None, :]
    ok = bits[None, :] >= high[:, None]
    return (*prev, grid[ok])


@functools.cache
def ball_size(width: int, radius: int) -> int:
    if radius < 0:
        return 0
    radius = min(radius, width)
    from math import comb

    return sum(comb(width, j) for j in range(radius + 1))


@functools.cache
def ring_masks(
    width: int, lo: int, hi: int
) -> tuple[NDArray[np.int64], NDArray[np.uint8]]:
    """Masks with lo <= popcount <= hi (ring order) and their popcounts."""
    lo, hi = max(lo, 0), min(hi, width)
    if hi < lo:
        return np.zeros(0, np.int64), np.zeros(0, np.uint8)
    rings = _rings(width, hi)[lo:]
    masks = np.concatenate(rings)
    pops = np.concatenate(
        [np.full(r.size, lo + j, np.uint8) for j, r in enumerate(rings)]
    )
    masks.flags.writeable = False
    pops.flags.writeable = False
    return masks, pops


@dataclass(frozen=True)
class ProbePlan:
    """Every bucket to read for the rings (lo_i, hi_i] of each group, as offsets
    relative to the query's own bucket in each group."""

    masks: NDArray[np.int64]
    group: NDArray[np.intp]  # which group each mask belongs to
    base: NDArray[np.int64]  # that group's base in the entries array
    pops: NDArray[np.uint8]  # bits of the mask (= distance, for full-code layouts)
    _within: dict[int, NDArray[np.intp]] = field(
        default_factory=dict, compare=False, repr=False
    )

    def within(self, t: int) -> NDArray[np.intp]:
        """Positions of the masks with at most t bits (cached)."""
        found = self._within.get(t)
        if found is None:
            found = self._within[t] = np.flatnonzero(self.pops <= t)
        return found


@functools.lru_cache(maxsize=256)
def probe_plan(layout: Layout, lo: tuple[int, ...], hi: tuple[int, ...]) -> ProbePlan:
    masks, groups, bases, pops = [], [], [], []
    for i, (g, a, b) in enumerate(zip(layout.groups, lo, hi, strict=True)):
        m, p = ring_masks(g.width, a + 1, b)
        # numeric order: masks sharing their high bits stay together, and so do
        # their buckets (query ^ mask) in the table: neighbouring cache lines
        order = np.argsort(m, kind="stable")
        masks.append(m[order])
        pops.append(p[order])
        groups.append(np.full(m.size, i, np.intp))
        bases.append(np.full(m.size, layout.bases[i], np.int64))
    return ProbePlan(
        np.concatenate(masks),
        np.concatenate(groups),
        np.concatenate(bases),
        np.concatenate(pops),
    )


# ------------------------------------------------------------------------ tables


class MultiIndex:
    """The tables of one collection (see the module docstring)."""

    def __init__(self, layout: Layout, slots: int = 0) -> None:
        self.layout = layout
        self._entries = np.zeros(layout.buckets, np.int64)
        self._caps = np.zeros(layout.buckets, np.int32)
        self._slots = self._new_slots(max(slots, 1024))
        self._used = 0  # slots handed out (live regions + garbage)
        self._garbage = 0
        self.rows = 0  # rows indexed: 0 .. rows-1

    @classmethod
    def build(cls, layout: Layout, words: NDArray[np.uint64]) -> MultiIndex:
        """Tables for rows 0..n-1 in one pass per group: a stable counting sort of
        the group's bucket numbers, tight buckets (no headroom, no garbage)."""
        n = words.shape[0]
        index = cls(layout, n * layout.m)
        rows_out, codes_out = index._slots
        compiled = hamming.native()
        pos = 0
        for i, g in enumerate(layout.groups):
            if compiled is not None:  # both passes in C, no temporaries
                counts = np.empty(1 << g.width, np.int64)
                compiled.group_sort(
                    words,
                    words.shape[1],
                    g.word,
                    g.shift,
                    g.width,
                    counts,
                    rows_out[pos : pos + n],
                    None if codes_out is None else codes_out[pos : pos + n],
                )
            else:
                key = layout.group_key(words, i)
                order = _stable_order(key, g.width)
                counts = np.bincount(key, minlength=1 << g.width).astype(np.int64)
                rows_out[pos : pos + n] = order
                if codes_out is not None:
                    codes_out[pos : pos + n] = words[order, 0]
            starts = np.empty_like(counts)
            starts[0] = 0
            np.cumsum(counts[:-1], out=starts[1:])
            starts += pos
            base = layout.bases[i]
            index._entries[base : base + counts.size] = starts << LEN_BITS | counts
            index._caps[base : base + counts.size] = counts
            pos += n
        index._used = pos
        index.rows = n
        return index

    @property
    def nbytes(self) -> int:
        rows, codes = self._slots
        size = rows.nbytes + (codes.nbytes if codes is not None else 0)
        return int(self._entries.nbytes + self._caps.nbytes + size)

    @property
    def garbage(self) -> int:
        return self._garbage

    @property
    def slots_used(self) -> int:
        return self._used

    def _new_slots(
        self, size: int
    ) -> tuple[NDArray[np.int32], NDArray[np.uint64] | None]:
        codes = np.zeros(size, np.uint64) if self.layout.store_codes else None
        return np.zeros(size, np.int32), codes

    # ----------------------------------------------------------------- append

    def append(self, words: NDArray[np.uint64], first_row: int) -> None:
        """Index rows first_row .. first_row + len(words) - 1 (must be self.rows)."""
        k = words.shape[0]
        if first_row != self.rows:
            raise ValueError(f"append at row {first_row}, tables hold {self.rows}")
        if k == 0:
            return
        keys = self.layout.group_keys(words)
        # bucket numbers in ascending order (groups occupy ascending ranges, so
        # per-group radix sorts concatenate into one sorted list)
        items, bucket_parts = [], []
        for i, g in enumerate(self.layout.groups):
            order = _stable_order(keys[:, i], g.width)
            items.append(order)
            bucket_parts.append(keys[order, i] + self.layout.bases[i])
        item_of = np.concatenate(items)  # index into this batch
        bucket_of = np.concatenate(bucket_parts)
        first = np.flatnonzero(np.r_[True, bucket_of[1:] != bucket_of[:-1]])
        buckets = bucket_of[first]
        counts = np.diff(np.r_[first, bucket_of.size])
        entry = self._entries[buckets]
        start, length = entry >> LEN_BITS, entry & LEN_MASK
        need = length + counts
        if int(need.max()) > LEN_MASK:
            raise OverflowError("a bucket would exceed 2^31 rows")
        cap = self._caps[buckets].astype(np.int64)
        move = np.flatnonzero(need > cap)
        new_start = start.copy()
        if move.size:
            new_cap = need[move] + (need[move] >> 1) + 4  # 1.5x: copies amortise
            offsets = np.zeros(move.size, np.int64)
            np.cumsum(new_cap[:-1], out=offsets[1:])
            new_start[move] = self._used + offsets
            self._reserve(self._used + int(new_cap.sum()))
            rows_s, codes_s = self._slots
            old = move[length[move] > 0]
            if old.size:  # copy the full buckets to their new homes
                src = concat_ranges(start[old], length[old])
                dst = concat_ranges(new_start[old], length[old])
                rows_s[dst] = rows_s[src]
                if codes_s is not None:
                    codes_s[dst] = codes_s[src]
            self._used += int(new_cap.sum())
            self._garbage += int(cap[move].sum())
            self._caps[buckets[move]] = new_cap
        rows_s, codes_s = self._slots
        dest = np.arange(bucket_of.size) + np.repeat(new_start + length - first, counts)
        rows_s[dest] = first_row + item_of
        if codes_s is not None:
            codes_s[dest] = words[item_of, 0]
        # rows first (a reader that sees a new entry must also see that rows past
        # its snapshot exist, to drop them), then the entries: a reader that sees
        # the new entries sees the slots written above
        self.rows += k
        self._entries[buckets] = new_start << LEN_BITS | need

    def _reserve(self, size: int) -> None:
        rows, codes = self._slots
        if size <= rows.size:
            return
        grown = self._new_slots(max(size, rows.size + rows.size // 2))
        grown[0][: self._used] = rows[: self._used]
        if codes is not None and grown[1] is not None:
            grown[1][: self._used] = codes[: self._used]
        self._slots = grown  # published before any entry points past the old end

    def compacted(self) -> MultiIndex:
        """The same buckets without garbage (a new object: readers of this one are
        undisturbed). Costs one pass over the slots."""
        out = MultiIndex(self.layout, self._used - self._garbage)
        entry = self._entries
        start, length = entry >> LEN_BITS, entry & LEN_MASK
        new_start = np.zeros_like(length)
        np.cumsum(length[:-1], out=new_start[1:])
        nz = np.flatnonzero(length)
        src = concat_ranges(start[nz], length[nz])
        rows_s, codes_s = self._slots
        total = int(length.sum())
        out_rows, out_codes = out._slots
        out_rows[:total] = rows_s[src]
        if out_codes is not None and codes_s is not None:
            out_codes[:total] = codes_s[src]
        out._entries[:] = new_start << LEN_BITS | length
        out._caps[:] = length
        out._used = total
        out.rows = self.rows
        return out

    # ------------------------------------------------------------------ probe

    def buckets(
        self, query: NDArray[np.uint64], plan: ProbePlan
    ) -> tuple[NDArray[np.int64], NDArray[np.int32], NDArray[np.uint64] | None]:
        """The entries of the plan's buckets around the query, and the slot arrays
        to read them from (in that order: see the module docstring)."""
        qkeys = np.array(  # Python ints: cheaper than numpy calls on one row
            [_bucket_of(query, g) for g in self.layout.groups], np.int64
        )
        keys = plan.base + (qkeys[plan.group] ^ plan.masks)
        entry = self._entries[keys]  # entries first, then slots
        rows_s, codes_s = self._slots
        return entry, rows_s, codes_s

    def own_bucket(
        self, query: NDArray[np.uint64]
    ) -> tuple[int, int, NDArray[np.int32]]:
        """(start, length, slot rows) of the query's own bucket in a full-code table:
        one entry read, then the slots (the reader protocol's order)."""
        entry = int(self._entries[_bucket_of(query, self.layout.groups[0])])
        return entry >> LEN_BITS, entry & LEN_MASK, self._slots[0]

    def near_buckets(
        self, query: NDArray[np.uint64]
    ) -> tuple[NDArray[np.int64], NDArray[np.uint8], NDArray[np.int32]]:
        """Entries of the buckets within distance 1 of the query in a full-code
        table (its own first), their distances, then the slot rows (the reader
        protocol's order)."""
        g = self.layout.groups[0]
        masks, pops = ring_masks(g.width, 0, 1)
        entries = self._entries[masks ^ _bucket_of(query, g)]
        return entries, pops, self._slots[0]

    def probe(
        self,
        query: NDArray[np.uint64],
        lo: tuple[int, ...],
        hi: tuple[int, ...],
        words: NDArray[np.uint64],
        limit: int | None = None,
    ) -> Candidates:
        """Every row in the buckets of rings (lo_i, hi_i] around the query, with its
        exact distance, duplicates and rows past any snapshot included (the caller
        filters); rows farther than `limit` may be left out. Row numbers are
        gathered only for the candidates the caller keeps (`Candidates.rows`).
        `words` (a snapshot's codes) is read only for codes wider than one word."""
        plan = probe_plan(self.layout, lo, hi)
        if plan.masks.size == 0:
            return Candidates.none()
        entry, rows_s, codes_s = self.buckets(query, plan)
        if codes_s is not None and hamming.SCAN_KERNEL == "c":
            bound = self.layout.code_bits if limit is None else limit
            index, dist = hamming.bucket_distances(
                entry, LEN_BITS, codes_s, int(query[0]), bound
            )
            return Candidates(rows_s, index, dist)
        length = entry & LEN_MASK
        nz = np.flatnonzero(length)
        if nz.size == 0:
            return Candidates.none()
        length = length[nz]
        index = concat_ranges(entry[nz] >> LEN_BITS, length)
        if self.layout.full_code:
            return Candidates(rows_s, index, np.repeat(plan.pops[nz], length))
        if codes_s is not None:
            xor = codes_s[index]
            np.bitwise_xor(xor, query[0], out=xor)
            return Candidates(rows_s, index, np.bitwise_count(xor))
        # wide codes: verify against the snapshot's rows (rows past it: distance 0
        # placeholder, the caller drops them anyway)
        rows = rows_s[index]
        inside = rows < words.shape[0]
        d = np.zeros(rows.size, np.int32)
        sub = words[rows[inside]]
        d[inside] = np.bitwise_count(sub ^ query).sum(axis=1, dtype=np.int32)
        return Candidates(rows, np.arange(rows.size), d)


@dataclass(frozen=True)
class Candidates:
    """Rows seen by one probe pass: slot positions into `slot_rows` (the array that
    pass read) and exact distances; row numbers on demand."""

    slot_rows: NDArray[np.int32]
    index: NDArray[np.int64]
    dist: NDArray[np.integer]

    @classmethod
    def none(cls) -> Candidates:
        return cls(np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int32))

    def rows(self, sel: NDArray[np.int64] | None = None) -> NDArray[np.int32]:
        return self.slot_rows[self.index if sel is None else self.index[sel]]


def _bucket_of(query: NDArray[np.uint64], g: Group) -> int:
    """The query's bucket number in group g's table (not offset by its base)."""
    return (int(query[g.word]) >> g.shift) & ((1 << g.width) - 1)


def _stable_order(key: NDArray[np.int64], width: int) -> NDArray[np.int32]:
    """argsort(key, stable) for keys < 2^width: numpy's radix sort on <= 16-bit
    integers, two passes (LSD) for wider keys."""
    if width <= 16:
        return np.argsort(key.astype(np.uint16), kind="stable").astype(np.int32)
    low = (key & 0xFFFF).astype(np.uint16)
    high = (key >> 16).astype(np.uint16)
    first = np.argsort(low, kind="stable")
    second = np.argsort(high[first], kind="stable")
    return first[second].astype(np.int32)
