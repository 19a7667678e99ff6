"""id -> row of the live items of one collection: open addressing over 64-bit id
hashes, every operation vectorised over a batch.

Why not a dict: a Python dict of 10M str -> int costs ~120 B per item and ~0.3 us per
insert; this table costs 8 B of hash per row plus 4 B per slot (2-4 slots per item)
and inserts a 10,000-item batch in a few numpy passes. Equal hashes are confirmed by
comparing the id bytes (the caller's `same` callback), so a hash collision costs time,
never correctness.

Writers only (the shard's per-collection lock): searches never read it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray

from copyfree import hamming

EMPTY = -1
DELETED = -2  # a removed id: lookups probe past it; reclaimed when the table grows
_MIN_SLOTS = 1024

# same(stored_rows, query_index) -> bool array: is the id of stored row i the id of
# query item query_index[i]?
SameId = Callable[[NDArray[np.int64], NDArray[np.int64]], NDArray[np.bool_]]


class IdMap:
    """Open addressing with linear probing; load factor kept <= 1/2."""

    def __init__(self, rows_capacity: int = 0) -> None:
        self._table = np.full(_MIN_SLOTS, EMPTY, np.int32)
        self._hash = np.zeros(max(rows_capacity, 16), np.uint64)  # by row
        self._used = 0  # slots that are not EMPTY (live + DELETED)
        self._live = 0

    @property
    def live(self) -> int:
        return self._live

    @property
    def nbytes(self) -> int:
        return int(self._table.nbytes + self._hash.nbytes)

    @property
    def row_hash_array(self) -> NDArray[np.uint64]:
        """The by-row hash array itself (a reload faults it in ahead of use)."""
        return self._hash

    def row_hashes(self, rows: NDArray[np.int64]) -> NDArray[np.uint64]:
        return self._hash[rows]

    # ----------------------------------------------------------------- reads

    def lookup(
        self, hashes: NDArray[np.uint64], same: SameId
    ) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """(row, slot) of each query id; -1 where absent."""
        k = hashes.size
        rows = np.full(k, -1, np.int64)
        slots = np.full(k, -1, np.int64)
        mask = self._table.size - 1
        pos = (hashes & np.uint64(mask)).astype(np.int64)
        pending = np.arange(k)
        while pending.size:
            p = pos[pending]
            occ = self._table[p].astype(np.int64)
            done = occ == EMPTY
            live = np.flatnonzero(occ >= 0)
            if live.size:
                cand = pending[live]
                hit = self._hash[occ[live]] == hashes[cand]
                if hit.any():
                    h_idx = live[hit]
                    eq = same(occ[h_idx], pending[h_idx])
                    found = h_idx[eq]
                    rows[pending[found]] = occ[found]
                    slots[pending[found]] = p[found]
                    done[found] = True
            pending = pending[~done]
            pos[pending] = (pos[pending] + 1) & mask
        return rows, slots

    # ---------------------------------------------------------------- writes

    def upsert(
        self, hashes: NDArray[np.uint64], rows: NDArray[np.int64], same: SameId
    ) -> NDArray[np.int64]:
        """Map each id to its new row (rows ascending = newer). The newest row of an
        id wins; returns the rows it superseded (older rows of the same ids, from
        earlier batches or earlier in this one), which the caller tombstones."""
        k = hashes.size
        if k == 0:
            return np.zeros(0, np.int64)
        self._grow_rows(int(rows.max()) + 1)
        self._hash[rows] = hashes
        self._reserve(k)
        mask = self._table.size - 1
        pos = (hashes & np.uint64(mask)).astype(np.int64)
        pending = np.arange(k)
        superseded: list[NDArray[np.int64]] = []
        while pending.size:
            p = pos[pending]
            occ = self._table[p].astype(np.int64)
            advance = np.ones(pending.size, bool)
            done = np.zeros(pending.size, bool)
            # 1. the same id already sits here: the newest row of the id stays
            live = np.flatnonzero(occ >= 0)
            if live.size:
                hit = live[self._hash[occ[live]] == hashes[pending[live]]]
                if hit.size:
                    hit = hit[same(occ[hit], pending[hit])]
                if hit.size:
                    superseded.append(
                        self._keep_newest(p[hit], occ[hit], rows[pending[hit]])
                    )
                    done[hit] = True
            # 2. an empty slot: claim it; of several claimants one wins (numpy keeps
            # one of the writes), the others look at the slot again next round
            empty = np.flatnonzero(occ == EMPTY)
            if empty.size:
                self._table[p[empty]] = rows[pending[empty]]
                won = self._table[p[empty]] == rows[pending[empty]]
                done[empty[won]] = True
                advance[empty[~won]] = False
                self._used += int(won.sum())
                self._live += int(won.sum())
            keep = ~done
            pending, advance = pending[keep], advance[keep]
            step = pending[advance]
            pos[step] = (pos[step] + 1) & mask
        if not superseded:
            return np.zeros(0, np.int64)
        return np.concatenate(superseded)

    def load_log(
        self,
        hashes: NDArray[np.uint64],
        data: NDArray[np.uint8],
        offsets: NDArray[np.int64],
        same: SameId,
    ) -> NDArray[np.int64]:
        """A reload's insert of rows 0..n-1 (ids data[offsets[r]:offsets[r + 1]])
        into an empty map: upsert(hashes, rows 0..n-1, same), in one sequential C
        pass when the kernels are built (~10x the vectorised rounds at 10M rows)."""
        n = hashes.size
        compiled = hamming.native()
        if compiled is None or self._used or n == 0:
            return self.upsert(hashes, np.arange(n, dtype=np.int64), same)
        self._grow_rows(n)
        self._hash[:n] = hashes
        self._reserve(n)
        superseded = np.empty(n, np.int64)
        offsets = np.ascontiguousarray(offsets[: n + 1], np.int64)
        dropped = compiled.idmap_insert(
            self._table, self._hash, np.ascontiguousarray(data), offsets, superseded
        )
        self._used = self._live = n - dropped
        return superseded[:dropped]

    def _keep_newest(
        self, slots: NDArray[np.int64], old: NDArray[np.int64], new: NDArray[np.int64]
    ) -> NDArray[np.int64]:
        """Several rows of one id may meet at one slot in a round: the largest row
        (the slot's or a newcomer's) stays; every other is returned."""
        order = np.lexsort((new, slots))
        slots, old, new = slots[order], old[order], new[order]
        last = np.ones(slots.size, bool)
        last[:-1] = slots[1:] != slots[:-1]
        best_new = new[last]
        winner_slots, winner_old = slots[last], old[last]
        replace = best_new > winner_old
        self._table[winner_slots[replace]] = best_new[replace]
        losers = [new[~last], np.where(replace, winner_old, best_new)]
        return np.concatenate(losers)

    def remove(self, hashes: NDArray[np.uint64], same: SameId) -> NDArray[np.int64]:
        """Forget the ids; returns their rows (-1 where absent)."""
        rows, slots = self.lookup(hashes, same)
        found = slots >= 0
        # an id given twice in one call: the second lookup still found it
        uniq = np.unique(slots[found])
        self._table[uniq] = DELETED
        self._live -= int(uniq.size)
        first = np.zeros(rows.size, bool)
        if found.any():
            _, first_idx = np.unique(slots[found], return_index=True)
            first[np.flatnonzero(found)[first_idx]] = True
        rows[~first] = -1
        return rows

    def forget(self, slots: NDArray[np.int64]) -> None:
        """Mark slots (from lookup) as removed."""
        uniq = np.unique(slots[slots >= 0])
        self._table[uniq] = DELETED
        self._live -= int(uniq.size)

    def bulk_load(self, hashes: NDArray[np.uint64], rows: NDArray[np.int64]) -> None:
        """Insert ids known to be distinct and absent (a rebuild or a compaction)."""
        self._grow_rows(int(rows.max(initial=-1)) + 1)
        self._hash[rows] = hashes
        self._reserve(rows.size)
        self._insert_distinct(rows)

    # -------------------------------------------------------------- growth

    def _grow_rows(self, rows: int) -> None:
        if rows > self._hash.size:
            grown = np.zeros(max(rows, 2 * self._hash.size), np.uint64)
            grown[: self._hash.size] = self._hash
            self._hash = grown

    def _reserve(self, extra: int) -> None:
        """Keep (used + extra) <= size / 2; rehash the live rows when it would not."""
        if 2 * (self._used + extra) <= self._table.size:
            return
        live_rows = self._table[self._table >= 0].astype(np.int64)
        size = _MIN_SLOTS
        while size < 2 * (live_rows.size + extra):
            size *= 2
        self._table = np.full(size, EMPTY, np.int32)
        self._used = self._live = 0
        self._insert_distinct(live_rows)

    def _insert_distinct(self, rows: NDArray[np.int64]) -> None:
        mask = self._table.size - 1
        pos = (self._hash[rows] & np.uint64(mask)).astype(np.int64)
        pending = np.arange(rows.size)
        while pending.size:
            p = pos[pending]
            empty = self._table[p] == EMPTY
            claim = pending[empty]
            self._table[p[empty]] = rows[claim]
            won = np.zeros(pending.size, bool)
            won[empty] = self._table[p[empty]] == rows[claim]
            advance = ~empty  # losers of a claim retry the same slot
            pending, advance = pending[~won], advance[~won]
            step = pending[advance]
            pos[step] = (pos[step] + 1) & mask
        self._used += rows.size
        self._live += rows.size
