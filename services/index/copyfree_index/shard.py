"""In-memory search state of one index shard: per collection, packed codes in contiguous
numpy arrays, exact two-stage Detect and tie-aware Similar. Pure: numpy only, no grpc,
no I/O.

Layout per collection (rows are append-only; capacity doubles):
- words (n, W) uint64: first keys (registry) or retrieval codes (copyright-free), as
  copyfree.codes.to_words lays them out;
- vectors (n, D): int16 second keys (registry) or int8 fine codes (copyright-free);
- alive (n,) bool: False for tombstones (deleted or replaced rows);
- ids and metadata: two byte buffers with int64 offsets (ragged.Ragged), metadata in
  the protobuf wire form of WorkMetadata;
- an id map (idmap.IdMap) from id to live row, and multi-index hash tables
  (mih.MultiIndex) over the codes once the collection has MIN_ROWS rows.
A replace or delete marks the old row dead; nothing is rebuilt until compaction
(tombstones > half the rows), which copies the live rows into new arrays.

Concurrency: one writer per collection at a time (its lock); searches take no lock at
all. A write fills rows past n, grows arrays by copying, copies the alive mask before
tombstoning (copy-on-write), and finally publishes a new immutable Snapshot; a search
reads the current Snapshot once and sees a consistent collection however long it runs.
The hash tables are shared between snapshots and updated in place, in an order that
keeps them correct for every reader (see mih.py); readers drop rows past their n.

Which search runs (multi-index hashing or a blocked scan) is decided per query in
copyfree_index.search from N, the radius and the table layout.
"""

from __future__ import annotations

import enum
import logging
import secrets
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

from copyfree import codes
from copyfree.errors import FailedPrecondition, InvalidInput, NotFound
from copyfree_index import mih, prefault, search
from copyfree_index.idmap import IdMap
from copyfree_index.ragged import (
    EMPTY_METADATA,
    Metadata,
    Ragged,
    bytes_equal,
    concat_ranges,
    encode_metadata,
    hash_items,
)

__all__ = [
    "EMPTY_METADATA",
    "CollectionIndex",
    "CollectionKind",
    "CollectionSpec",
    "Deletion",
    "DetectResult",
    "ItemBatch",
    "Metadata",
    "ModelRef",
    "ShardIndex",
    "SimilarResult",
]

log = logging.getLogger(__name__)

REGISTRY_CODE_BITS = codes.FIRST_KEY_BITS  # first keys: 64 bits
REGISTRY_VECTOR_DIM = codes.EMBEDDING_DIM  # second keys: 64 int16
_INITIAL_CAPACITY = 256
_GARBAGE_SHARE = 3  # compact the hash tables' slots once 1/3 of them is garbage


class CollectionKind(enum.IntEnum):
    """Same numbers as copyfree.v1.CollectionKind."""

    REGISTRY = 1
    COPYRIGHT_FREE = 2

    @property
    def label(self) -> str:
        return "registry" if self is CollectionKind.REGISTRY else "copyright-free"


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: str

    def __str__(self) -> str:
        return f"{self.name!r} version {self.version!r}"


@dataclass(frozen=True)
class CollectionSpec:
    """What a collection is: fixed at creation, recorded in the store's meta."""

    name: str
    kind: CollectionKind
    model: ModelRef
    code_bits: int  # registry: 64 (first keys)
    vector_dim: int  # registry: 64 (second keys); copyright-free: fine code length

    @classmethod
    def registry(cls, name: str, model: ModelRef) -> CollectionSpec:
        return cls(
            name,
            CollectionKind.REGISTRY,
            model,
            REGISTRY_CODE_BITS,
            REGISTRY_VECTOR_DIM,
        )

    @property
    def code_bytes(self) -> int:
        return self.code_bits // 8

    @property
    def vector_dtype(self) -> np.dtype[Any]:
        return np.dtype(np.int16 if self.kind is CollectionKind.REGISTRY else np.int8)


@dataclass(frozen=True)
class ItemBatch:
    """Items to insert or replace, row-aligned: ids (UTF-8), codes (n, code_bytes)
    uint8 packed MSB-first, vectors (n, vector_dim) int16 (second keys) or int8 (fine
    codes), metadata records (WorkMetadata wire form, see ragged.Metadata)."""

    ids: Ragged
    codes: NDArray[np.uint8]
    vectors: NDArray[Any]
    metadata: Ragged

    def __post_init__(self) -> None:
        n = len(self.ids)
        if self.codes.ndim != 2 or self.vectors.ndim != 2:
            raise ValueError("codes and vectors must be 2-d arrays")
        if not (
            self.codes.shape[0] == self.vectors.shape[0] == len(self.metadata) == n
        ):
            raise ValueError(
                f"batch rows disagree: {n} ids, {self.codes.shape[0]} codes, "
                f"{self.vectors.shape[0]} vectors, {len(self.metadata)} metadata"
            )

    @classmethod
    def of(
        cls,
        ids: Sequence[str],
        codes: NDArray[np.uint8],
        vectors: NDArray[Any],
        metadata: Sequence[Metadata] | None = None,
    ) -> ItemBatch:
        """From Python values (tests, tools); the servicer builds batches from the
        request bytes directly."""
        meta = metadata if metadata is not None else [EMPTY_METADATA] * len(ids)
        return cls(Ragged.from_strings(ids), codes, vectors, encode_metadata(meta))

    @classmethod
    def empty(cls, spec: CollectionSpec) -> ItemBatch:
        return cls(
            Ragged.empty(),
            np.zeros((0, spec.code_bytes), np.uint8),
            np.zeros((0, spec.vector_dim), spec.vector_dtype),
            Ragged.empty(),
        )

    @classmethod
    def concat(cls, batches: Sequence[ItemBatch], spec: CollectionSpec) -> ItemBatch:
        if not batches:
            return cls.empty(spec)
        if len(batches) == 1:
            return batches[0]
        return cls(
            Ragged.concat([b.ids for b in batches]),
            np.concatenate([b.codes for b in batches]),
            np.concatenate([b.vectors for b in batches]),
            Ragged.concat([b.metadata for b in batches]),
        )

    def __len__(self) -> int:
        return len(self.ids)

    def id_list(self) -> list[str]:
        return self.ids.to_strings()

    def metadata_list(self) -> list[Metadata]:
        return [Metadata.decode(b) for b in self.metadata.to_bytes()]

    def slice(self, start: int, stop: int) -> ItemBatch:
        return ItemBatch(
            self.ids.slice(start, stop),
            self.codes[start:stop],
            self.vectors[start:stop],
            self.metadata.slice(start, stop),
        )


@dataclass(frozen=True)
class Deletion:
    """The ids one delete removed (a log record, like an ItemBatch upsert)."""

    ids: Ragged

    def id_list(self) -> list[str]:
        return self.ids.to_strings()


Record = ItemBatch | Deletion


class DetectHit(NamedTuple):  # a tuple: built by the hundred per query
    id: str
    hamming: int
    cosine: float  # float32 precision: the order and the wire agree
    metadata_raw: bytes  # WorkMetadata wire bytes

    @property
    def metadata(self) -> Metadata:
        return Metadata.decode(self.metadata_raw)


@dataclass(frozen=True)
class DetectResult:
    candidates: list[DetectHit]  # stage 1, by (cosine desc, id asc), capped
    stage1_count: int  # all stage-1 hits before the cap
    nearest: list[DetectHit]  # only when stage1_count == 0: by (hamming, id)
    searched: int  # live items searched


class SimilarHit(NamedTuple):
    id: str
    hamming: int
    fine_cosine: float
    metadata_raw: bytes

    @property
    def metadata(self) -> Metadata:
        return Metadata.decode(self.metadata_raw)


@dataclass(frozen=True)
class SimilarResult:
    hits: list[SimilarHit]  # by (hamming asc, fine_cosine desc, id asc)
    searched: int


@dataclass(frozen=True)
class MemoryUse:
    """Bytes held for one collection, split the way docs/benchmarks.md reports it."""

    raw: int  # codes + vectors + id bytes + metadata bytes of the rows
    tables: int  # multi-index hash tables
    bookkeeping: int  # id map, record offsets, alive mask
    spare: int  # allocated capacity not holding rows yet (arrays double)

    @property
    def total(self) -> int:
        return self.raw + self.tables + self.bookkeeping + self.spare


@dataclass(frozen=True)
class CollectionStats:
    spec: CollectionSpec
    items: int
    tombstones: int
    memory_bytes: int


# ---------------------------------------------------------------------- records


@dataclass(frozen=True)
class Records:
    """Read-only view of the ids and metadata of rows 0..n-1."""

    id_data: NDArray[np.uint8]
    id_off: NDArray[np.integer]  # n + 1 (uint32, int64 past 4 GiB)
    meta_data: NDArray[np.uint8]
    meta_off: NDArray[np.integer]  # n + 1

    def __getitem__(self, row: int) -> str:
        a, b = int(self.id_off[row]), int(self.id_off[row + 1])
        return self.id_data[a:b].tobytes().decode()

    def metadata(self, row: int) -> bytes:
        a, b = int(self.meta_off[row]), int(self.meta_off[row + 1])
        return self.meta_data[a:b].tobytes()

    def fetch(self, rows: Sequence[int]) -> tuple[list[str], list[bytes]]:
        """Ids and metadata records of a few rows (results): two ragged gathers
        instead of two numpy slices per row."""
        index = np.asarray(rows, np.int64)
        ids = _take(self.id_data, self.id_off, index).to_strings()
        metas = _take(self.meta_data, self.meta_off, index).to_bytes()
        return ids, metas

    def ids(self, rows: NDArray[np.integer]) -> Ragged:
        return _take(self.id_data, self.id_off, rows)

    def metas(self, rows: NDArray[np.integer]) -> Ragged:
        return _take(self.meta_data, self.meta_off, rows)


def _take(
    data: NDArray[np.uint8], off: NDArray[np.integer], rows: NDArray[np.integer]
) -> Ragged:
    index = np.asarray(rows, np.int64)
    starts = off[index].astype(np.int64)
    lengths = off[index + 1].astype(np.int64) - starts
    keep = lengths > 0
    gather = concat_ranges(starts[keep], lengths[keep])
    return Ragged.from_lengths(data[gather], lengths)


class _Buffer:
    """A growable byte buffer with offsets per row (writer side of Records).

    Offsets are uint32 (4 B per row instead of 8) until the buffer passes 4 GiB."""

    def __init__(self, rows: int) -> None:
        self.data = np.zeros(1024, np.uint8)
        self.off: NDArray[np.integer] = np.zeros(rows + 1, np.uint32)

    def ensure_rows(self, rows: int) -> None:
        if rows + 1 > self.off.size:
            grown = np.zeros(rows + 1, self.off.dtype)
            grown[: self.off.size] = self.off
            self.off = grown

    def append(self, n: int, items: Ragged) -> None:
        """Rows n .. n+len(items)-1 (off must already have room)."""
        k = len(items)
        start = int(self.off[n])
        end = start + items.nbytes
        if end > np.iinfo(self.off.dtype).max:
            self.off = self.off.astype(np.int64)  # a new array: snapshots keep theirs
        if end > self.data.size:
            grown = np.zeros(max(end, 2 * self.data.size), np.uint8)
            grown[:start] = self.data[:start]
            self.data = grown
        self.data[start:end] = items.data[: items.nbytes]
        self.off[n + 1 : n + k + 1] = items.offsets[1:] + start

    def reserve(self, nbytes: int) -> None:
        """Room for nbytes in an empty buffer (bulk loads size it once)."""
        if nbytes > self.data.size:
            self.data = np.zeros(nbytes, np.uint8)

    def nbytes_used(self, n: int) -> int:
        return int(self.off[n])

    def ragged(self, n: int) -> Ragged:
        """Rows 0..n-1 as a Ragged (int64 offsets)."""
        return Ragged(self.data, self.off[: n + 1].astype(np.int64))


@dataclass(frozen=True)
class Snapshot:
    """Consistent read-only view of a collection's first n rows."""

    spec: CollectionSpec
    view: search.View
    vectors: NDArray[Any]  # (n, D)
    records: Records

    @property
    def live(self) -> int:
        return self.view.live

    @property
    def words(self) -> NDArray[np.uint64]:
        return self.view.words

    @property
    def alive(self) -> NDArray[np.bool_]:
        return self.view.alive

    @property
    def tombstones(self) -> int:
        return self.view.rows - self.view.live


# --------------------------------------------------------------------- searches


def detect(
    snap: Snapshot,
    first_key: NDArray[np.uint64],
    second_key: NDArray[np.int16],
    max_hamming: int,
    fallback_k: int,
    max_candidates: int,
) -> DetectResult:
    """Stage 1: live rows with Hamming(first keys) <= max_hamming, ordered by
    (cosine desc, id), at most max_candidates. If there are none: the fallback_k
    nearest live rows by (hamming, id)."""
    (rows, d), (near, near_d) = search.detect_search(
        snap.view, first_key, max_hamming, fallback_k
    )
    if rows.size:
        cos = _cosine32(snap.vectors[rows], second_key)
        picked = _first_ordered((-cos,), rows, snap.records, max_candidates)
        hits = _detect_hits(snap, rows[picked], d[picked], cos[picked])
        return DetectResult(hits, int(rows.size), [], snap.live)
    nearest: list[DetectHit] = []
    if near.size:
        picked = _first_ordered((near_d,), near, snap.records, fallback_k)
        cos = _cosine32(snap.vectors[near[picked]], second_key)
        nearest = _detect_hits(snap, near[picked], near_d[picked], cos)
    return DetectResult([], 0, nearest, snap.live)


def similar_rows(
    snap: Snapshot, code: NDArray[np.uint64], fine: NDArray[np.int8], top_n: int
) -> tuple[NDArray[np.int64], NDArray[np.int32], NDArray[np.float32]]:
    """The search part of similar(): the top_n rows in order, their distances and
    fine cosines (what faiss's search returns, plus the re-rank)."""
    rows, d = search.nearest(snap.view, code, top_n)
    if rows.size > 2 * top_n:
        rows, d = _best_of_last_ring(snap, rows, d, fine, top_n)
    cos = _cosine32(snap.vectors[rows], fine)
    picked = _first_ordered((d, -cos), rows, snap.records, top_n)
    return rows[picked], d[picked], cos[picked]


def _best_of_last_ring(
    snap: Snapshot,
    rows: NDArray[np.integer],
    d: NDArray[np.integer],
    fine: NDArray[np.int8],
    top_n: int,
) -> tuple[NDArray[np.integer], NDArray[np.integer]]:
    """Short codes tie by the hundred at the k-th distance: every row closer than it
    is in, and of the rows at it only those whose fine cosine reaches the
    (top_n - closer)-th best can be (ties at that cosine kept, for the id order)."""
    last = d.max()
    closer = np.flatnonzero(d < last)
    ring = np.flatnonzero(d == last)
    need = top_n - closer.size
    cos = _cosine32(snap.vectors[rows[ring]], fine)
    cut = -np.partition(-cos, need - 1)[need - 1]
    keep = np.concatenate([closer, ring[cos >= cut]])
    return rows[keep], d[keep]


def similar(
    snap: Snapshot, code: NDArray[np.uint64], fine: NDArray[np.int8], top_n: int
) -> SimilarResult:
    """Exact top_n live rows by (hamming asc, fine cosine desc, id asc)."""
    rows, d, cos = similar_rows(snap, code, fine, top_n)
    ids, metas = snap.records.fetch(rows.tolist())
    hits = list(map(SimilarHit, ids, d.tolist(), cos.tolist(), metas))
    return SimilarResult(hits, snap.live)


def _cosine32(vectors: NDArray[Any], query: NDArray[Any]) -> NDArray[np.float32]:
    """Cosines rounded to float32 before ordering, so the order a shard uses is the
    order the float32 values on the wire imply (the gateway merges on those).

    Same value as copyfree.codes.cosine, bit for bit: integer vectors make every dot
    product and squared norm an exact float64 integer whatever the summation order,
    and the sqrt, product and division are the same IEEE operations; this form just
    skips np.linalg.norm's overhead (it matters at ~100 rows per query)."""
    a = vectors.astype(np.float64)
    b = query.astype(np.float64)
    norms = np.sqrt(np.square(a).sum(axis=1))
    norms *= np.sqrt(b @ b)
    dots = a @ b
    np.divide(dots, norms, out=dots, where=norms > 0)
    dots[norms == 0] = 0.0
    return dots.astype(np.float32)


def _first_ordered(
    keys: Sequence[NDArray[Any]], rows: NDArray[np.int64], ids: Records, limit: int
) -> list[int]:
    """Positions into `rows` of the first `limit` by (keys..., id), keys ascending.

    numpy orders by the keys; ids are compared (in Python) only inside runs of rows
    tied on every key, so untied results cost no Python sorting at all."""
    if limit <= 0 or rows.size == 0:
        return []
    order = np.lexsort(tuple(reversed(keys)))  # lexsort: last key is primary
    if order.size > limit:
        boundary = order[limit - 1]
        tail = order[limit:]
        tied = np.ones(tail.size, dtype=bool)
        for k in keys:
            tied &= k[tail] == k[boundary]
        order = np.concatenate([order[:limit], tail[tied]])
    result: list[int] = order.tolist()
    if order.size > 1:
        same = np.ones(order.size - 1, dtype=bool)  # same[i]: order[i] ties order[i+1]
        for k in keys:
            ordered = k[order]
            same &= ordered[1:] == ordered[:-1]
        if same.any():
            edges = np.diff(np.concatenate(([0], same.astype(np.int8), [0])))
            for a, b in zip(
                np.flatnonzero(edges == 1).tolist(),
                np.flatnonzero(edges == -1).tolist(),
                strict=True,
            ):
                result[a : b + 1] = sorted(
                    result[a : b + 1], key=lambda p: ids[int(rows[p])]
                )
    return result[:limit]


def _detect_hits(
    snap: Snapshot,
    rows: NDArray[np.int64],
    dist: NDArray[np.integer],
    cos: NDArray[np.float32],
) -> list[DetectHit]:
    ids, metas = snap.records.fetch(rows.tolist())
    return list(map(DetectHit, ids, dist.tolist(), cos.tolist(), metas))


# ------------------------------------------------------------------ one collection


class CollectionIndex:
    """Rows of one collection. Writes serialise on the collection's lock; reads use
    `snapshot()` and take no lock."""

    def __init__(self, spec: CollectionSpec, capacity: int = _INITIAL_CAPACITY) -> None:
        self.spec = spec
        capacity = max(1, capacity)
        self.lock = threading.Lock()
        self._words = np.zeros(
            (capacity, codes.words_per_code(spec.code_bits)), np.uint64
        )
        self._vectors = np.zeros((capacity, spec.vector_dim), spec.vector_dtype)
        self._alive = np.zeros(capacity, dtype=bool)
        self._ids = _Buffer(capacity)
        self._meta = _Buffer(capacity)
        self._seed = secrets.randbits(64)
        self._idmap = IdMap(capacity)
        self._tables: mih.MultiIndex | None = None
        self._n = 0
        self._live = 0
        self._snapshot = self._make_snapshot()

    # -------------------------------------------------------------- counters

    @property
    def rows(self) -> int:
        return self._n

    @property
    def live(self) -> int:
        return self._live

    @property
    def tombstones(self) -> int:
        return self._n - self._live

    @property
    def capacity(self) -> int:
        return int(self._words.shape[0])

    @property
    def tables(self) -> mih.MultiIndex | None:
        return self._tables

    def memory(self) -> MemoryUse:
        n, cap = self._n, self.capacity
        row_bytes = self._words[0].nbytes + self._vectors[0].nbytes
        id_bytes, meta_bytes = self._ids.nbytes_used(n), self._meta.nbytes_used(n)
        tables = self._tables.nbytes if self._tables is not None else 0
        offsets = self._ids.off.itemsize + self._meta.off.itemsize
        spare = (cap - n) * (row_bytes + 1 + offsets) + (
            self._ids.data.size - id_bytes + self._meta.data.size - meta_bytes
        )
        return MemoryUse(
            raw=n * row_bytes + id_bytes + meta_bytes,
            tables=tables,
            bookkeeping=self._idmap.nbytes + n * (1 + offsets),
            spare=spare,
        )

    @property
    def memory_bytes(self) -> int:
        return self.memory().total

    def needs_compaction(self) -> bool:
        return 2 * self.tombstones > self._n

    def snapshot(self) -> Snapshot:
        return self._snapshot

    # ----------------------------------------------------------------- writes

    def upsert(self, batch: ItemBatch) -> int:
        """Append rows; an id that was live is replaced (old row tombstoned); an id
        twice in the batch keeps its last copy. Returns how many ids were replaced."""
        k = len(batch)
        self._check_shapes(batch)
        if k == 0:
            return 0
        start = self._n
        self._ensure_capacity(start + k)
        self._write_rows(start, batch)  # rows past n: in no snapshot yet
        hashes = hash_items(batch.ids, self._seed)
        rows = np.arange(start, start + k, dtype=np.int64)
        old = self._idmap.upsert(hashes, rows, self._same_ids)
        replaced = old[old < start]
        self._alive[old[old >= start]] = False
        if replaced.size:
            self._tombstone(replaced)
        self._index_rows(start, start + k)
        self._n = start + k
        self._live += k - int(old.size)
        self._publish()
        return int(replaced.size)

    def delete(self, ids: Sequence[str]) -> tuple[list[str], list[str]]:
        """Tombstone live ids. Returns (deleted, missing), each in request order."""
        ids = list(ids)
        if not ids:
            return [], []
        query = Ragged.from_strings(ids)
        rows = self._idmap.remove(hash_items(query, self._seed), self._same_as(query))
        found = rows >= 0
        if found.any():
            self._tombstone(rows[found])
            self._live -= int(found.sum())
            self._publish()
        flags = found.tolist()
        return (
            [i for i, f in zip(ids, flags, strict=True) if f],
            [i for i, f in zip(ids, flags, strict=True) if not f],
        )

    def present(self, ids: Sequence[str]) -> list[str]:
        if not ids:
            return []
        query = Ragged.from_strings(list(ids))
        rows, _ = self._idmap.lookup(
            hash_items(query, self._seed), self._same_as(query)
        )
        return [i for i, r in zip(ids, rows.tolist(), strict=True) if r >= 0]

    def live_batch(self) -> ItemBatch:
        """The live rows, in row order, as one batch (for a store snapshot)."""
        rows = np.flatnonzero(self._alive[: self._n])
        return self._batch_of(rows)

    def compact(self) -> None:
        """Copy the live rows into new arrays (old snapshots keep the old ones)."""
        rows = np.flatnonzero(self._alive[: self._n])
        hashes = self._idmap.row_hashes(rows)
        batch = self._batch_of(rows)
        fresh = CollectionIndex(self.spec, max(_INITIAL_CAPACITY, rows.size))
        fresh._load_distinct(batch, hashes, self._seed)
        self._adopt(fresh)

    @classmethod
    def from_log(
        cls, spec: CollectionSpec, records: Iterable[Record], rows_hint: int = 0
    ) -> CollectionIndex:
        """Replay a log into a new collection while it is read. Each upsert is
        copied into arrays sized once from `rows_hint` (the store's count of upserted
        rows; they grow if it falls short), so every record can be dropped as soon as
        it is consumed: a reload peaks at the collection plus one reply, not at the
        whole log held twice. Deletes apply afterwards, each to the rows upserted
        before it; the id map and the hash tables are built in vectorised passes."""
        coll = cls(spec, max(_INITIAL_CAPACITY, rows_hint))
        faulting = coll._prefault()
        deletes: list[tuple[int, Ragged]] = []
        for record in records:
            if isinstance(record, Deletion):
                deletes.append((coll._n, record.ids))
                continue
            coll._check_shapes(record)
            n, k = coll._n, len(record)
            if n == 0 and 0 < k < rows_hint:
                # size the id and metadata bytes once too, from the first batch
                coll._ids.reserve(-(-record.ids.nbytes * rows_hint // k))
                coll._meta.reserve(-(-record.metadata.nbytes * rows_hint // k))
                faulting += prefault.in_background([coll._ids.data, coll._meta.data])
            coll._ensure_capacity(n + k)
            coll._write_rows(n, record)
            coll._n = n + k
        for thread in faulting:
            thread.join()
        if rows_hint and rows_hint != coll._n:
            log.info(
                "collection %r: the store counted %d upserted rows, its log holds %d",
                spec.name,
                rows_hint,
                coll._n,
            )
        coll._index_log(deletes)
        return coll

    def _prefault(self) -> list[threading.Thread]:
        return prefault.in_background(
            [
                self._words,
                self._vectors,
                self._alive,
                self._ids.off,
                self._meta.off,
                self._idmap.row_hash_array,
            ]
        )

    def _index_log(self, deletes: Sequence[tuple[int, Ragged]]) -> None:
        """Id map, deletes and hash tables for rows written by from_log."""
        k = self._n
        # The hash tables need only the codes: build them on the other core while
        # this thread builds the id map (numpy releases the GIL in both).
        layout = mih.choose_layout(self.spec.code_bits, k)
        built: list[mih.MultiIndex] = []
        builder = threading.Thread(
            target=lambda: built.append(mih.MultiIndex.build(layout, self._words[:k]))
        )
        if layout is not None:
            builder.start()
        if k:
            ids = self._ids.ragged(k)
            # rows are 0..k-1, so the insert's own indexes are rows too
            old = self._idmap.load_log(
                hash_items(ids, self._seed), ids.data, ids.offsets, self._rows_equal
            )
            self._alive[old] = False
        for horizon, ids in deletes:
            found, slots = self._idmap.lookup(
                hash_items(ids, self._seed), self._same_as(ids)
            )
            hit = (found >= 0) & (found < horizon)  # rows upserted before it
            if hit.any():
                self._idmap.forget(slots[hit])
                self._alive[found[hit]] = False
        self._live = int(np.count_nonzero(self._alive[:k]))
        if layout is not None:
            builder.join()
            if not built:
                raise RuntimeError("building the hash tables failed (see the log)")
            self._tables, self._built_rows = built[0], k
        self._publish()

    # --------------------------------------------------------------- helpers

    def _same_ids(
        self, stored: NDArray[np.int64], query: NDArray[np.int64]
    ) -> NDArray[np.bool_]:
        """Is the id of row stored[i] the id of the row being inserted at query[i]
        (query indexes the current upsert, whose rows start at self._n)?"""
        return self._rows_equal(stored, query + self._n)

    def _rows_equal(
        self, a: NDArray[np.int64], b: NDArray[np.int64]
    ) -> NDArray[np.bool_]:
        off = self._ids.off
        sa, sb = off[a].astype(np.int64), off[b].astype(np.int64)
        la, lb = off[a + 1] - sa, off[b + 1] - sb
        same = la == lb
        idx = np.flatnonzero(same)
        if idx.size:
            data = self._ids.data
            same[idx] = bytes_equal(data, sa[idx], data, sb[idx], la[idx])
        return same

    def _same_as(self, query: Ragged):  # noqa: ANN202 - a SameId callback
        off = self._ids.off

        def same(stored: NDArray[np.int64], q: NDArray[np.int64]) -> NDArray[np.bool_]:
            starts = off[stored].astype(np.int64)
            ls = off[stored + 1] - starts
            lq = query.offsets[q + 1] - query.offsets[q]
            eq = ls == lq
            idx = np.flatnonzero(eq)
            if idx.size:
                eq[idx] = bytes_equal(
                    self._ids.data,
                    starts[idx],
                    query.data,
                    query.offsets[q[idx]],
                    ls[idx],
                )
            return eq

        return same

    def _write_rows(self, start: int, batch: ItemBatch) -> None:
        """Copy a batch into rows start.. (capacity must be there) as live rows."""
        k = len(batch)
        self._words[start : start + k] = codes.to_words(batch.codes)
        self._vectors[start : start + k] = batch.vectors
        self._ids.append(start, batch.ids)
        self._meta.append(start, batch.metadata)
        self._alive[start : start + k] = True

    def _load_distinct(
        self, batch: ItemBatch, hashes: NDArray[np.uint64], seed: int
    ) -> None:
        k = len(batch)
        self._seed = seed
        self._ensure_capacity(k)
        self._ids.reserve(batch.ids.nbytes)
        self._meta.reserve(batch.metadata.nbytes)
        self._write_rows(0, batch)
        self._idmap.bulk_load(hashes, np.arange(k, dtype=np.int64))
        self._n = self._live = k
        self._index_rows(0, k)
        self._publish()

    def _adopt(self, other: CollectionIndex) -> None:
        self._words, self._vectors, self._alive = (
            other._words,
            other._vectors,
            other._alive,
        )
        self._ids, self._meta, self._seed = other._ids, other._meta, other._seed
        self._idmap, self._tables = other._idmap, other._tables
        self._built_rows = other._built_rows
        self._n, self._live = other._n, other._live
        self._publish()

    def _batch_of(self, rows: NDArray[np.int64]) -> ItemBatch:
        packed = np.ascontiguousarray(self._words[rows]).view(np.uint8)
        records = self._records(self._n)
        return ItemBatch(
            records.ids(rows),
            np.ascontiguousarray(packed[:, : self.spec.code_bytes]),
            self._vectors[rows].copy(),
            records.metas(rows),
        )

    def _index_rows(self, start: int, stop: int) -> None:
        """Bring the hash tables up to row `stop` (build them, grow into a wider
        layout, append, or drop their garbage), before the snapshot says so."""
        layout = mih.choose_layout(self.spec.code_bits, stop)
        tables = self._tables
        if layout is None:
            self._tables = None
            return
        if tables is None or (
            tables.layout != layout and stop >= 4 * max(1, self._built_rows)
        ):
            # first build, or a 4x bigger collection that a wider layout serves
            # better: like a hash table resize, amortised O(1) per row
            self._tables = mih.MultiIndex.build(layout, self._words[:stop])
            self._built_rows = stop
            return
        tables.append(self._words[start:stop], start)
        if tables.garbage * _GARBAGE_SHARE > tables.slots_used:
            self._tables = tables.compacted()

    _built_rows = 0

    def _publish(self) -> None:
        self._snapshot = self._make_snapshot()

    def _records(self, n: int) -> Records:
        return Records(
            self._ids.data,
            self._ids.off[: n + 1],
            self._meta.data,
            self._meta.off[: n + 1],
        )

    def _make_snapshot(self) -> Snapshot:
        n = self._n
        view = search.View(
            self._words[:n],
            self._alive[:n],
            self._live,
            self.spec.code_bits,
            self._tables,
        )
        return Snapshot(self.spec, view, self._vectors[:n], self._records(n))

    def _check_shapes(self, batch: ItemBatch) -> None:
        want_codes = (len(batch), self.spec.code_bytes)
        want_vectors = (len(batch), self.spec.vector_dim)
        if batch.codes.shape != want_codes or batch.vectors.shape != want_vectors:
            spec = self.spec
            raise InvalidInput(
                f"collection {spec.name!r} holds {spec.code_bits}-bit codes and "
                f"{spec.vector_dim}-element vectors; got codes {batch.codes.shape} "
                f"and vectors {batch.vectors.shape}"
            )

    def _ensure_capacity(self, rows: int) -> None:
        capacity = self.capacity
        self._ids.ensure_rows(max(rows, capacity))
        self._meta.ensure_rows(max(rows, capacity))
        if rows <= capacity:
            return
        while capacity < rows:
            capacity *= 2
        n = self._n
        words = np.zeros((capacity, self._words.shape[1]), np.uint64)
        vectors = np.zeros((capacity, self.spec.vector_dim), self.spec.vector_dtype)
        alive = np.zeros(capacity, dtype=bool)
        words[:n], vectors[:n], alive[:n] = (
            self._words[:n],
            self._vectors[:n],
            self._alive[:n],
        )
        self._words, self._vectors, self._alive = words, vectors, alive
        self._ids.ensure_rows(capacity)
        self._meta.ensure_rows(capacity)

    def _tombstone(self, rows: NDArray[np.int64]) -> None:
        alive = self._alive.copy()  # copy-on-write: snapshots keep their mask
        alive[rows] = False
        self._alive = alive


# ------------------------------------------------------------------------ the shard


class ShardIndex:
    """All collections of one shard. Thread-safe: writes lock their collection,
    searches read its latest snapshot without locking."""

    def __init__(self) -> None:
        self._collections: dict[str, CollectionIndex] = {}
        self._lock = threading.Lock()  # guards the dict (creating collections)

    def names(self) -> list[str]:
        return sorted(self._collections)

    def spec(self, name: str) -> CollectionSpec | None:
        coll = self._collections.get(name)
        return coll.spec if coll else None

    def collection(self, name: str) -> CollectionIndex:
        return self._require(name)

    def check_upsert(self, spec: CollectionSpec) -> None:
        """Raise unless a batch described by spec may go into its collection (which
        may not exist yet). Called before anything is written to the store."""
        existing = self.spec(spec.name)
        if existing is None:
            return
        _check_kind(existing, spec.kind)
        _check_model(existing, spec.model)
        if existing.code_bits != spec.code_bits:
            raise InvalidInput(
                f"code_bits {spec.code_bits} does not match collection {spec.name!r}, "
                f"which holds {existing.code_bits}-bit codes"
            )
        if existing.vector_dim != spec.vector_dim:
            raise InvalidInput(
                f"fine code length {spec.vector_dim} does not match collection "
                f"{spec.name!r}, which holds {existing.vector_dim}-byte fine codes"
            )

    def upsert(self, spec: CollectionSpec, batch: ItemBatch) -> tuple[int, int]:
        """Insert or replace; creates the collection. Returns (upserted, replaced)."""
        self.check_upsert(spec)
        coll = self._get_or_create(spec)
        with coll.lock:
            replaced = coll.upsert(batch)
        return len(batch), replaced

    def load_log(
        self, spec: CollectionSpec, records: Iterable[Record], rows_hint: int = 0
    ) -> None:
        """Replace the collection's contents by its replayed log (store load; see
        CollectionIndex.from_log)."""
        self.check_upsert(spec)
        coll = CollectionIndex.from_log(spec, records, rows_hint)
        with self._lock:
            self._collections[spec.name] = coll

    def present(self, name: str, ids: Sequence[str]) -> list[str]:
        """The ids (in order) that are live in the collection."""
        coll = self._require(name)
        with coll.lock:
            return coll.present(ids)

    def delete(self, name: str, ids: Sequence[str]) -> tuple[list[str], list[str]]:
        """Returns (deleted, missing)."""
        coll = self._require(name)
        with coll.lock:
            return coll.delete(ids)

    def needs_compaction(self, name: str) -> bool:
        coll = self._collections.get(name)
        return coll is not None and coll.needs_compaction()

    def live_batch(self, name: str) -> ItemBatch:
        coll = self._require(name)
        with coll.lock:
            return coll.live_batch()

    def compact(self, name: str) -> None:
        coll = self._require(name)
        with coll.lock:
            coll.compact()

    def snapshot(self, name: str) -> Snapshot:
        return self._require(name).snapshot()

    def detect(
        self,
        name: str,
        model: ModelRef,
        first_key: bytes,
        second_key: bytes,
        max_hamming: int,
        fallback_k: int,
        max_candidates: int,
    ) -> DetectResult:
        """Detection candidates (DESIGN.md §3). Keys in wire form (8 and 128 bytes)."""
        q1 = codes.to_words(
            codes.check_packed(first_key, REGISTRY_CODE_BITS, "query.first_key")
        )
        if len(second_key) != 2 * REGISTRY_VECTOR_DIM:
            raise InvalidInput(
                f"query.second_key must be {2 * REGISTRY_VECTOR_DIM} bytes "
                f"({REGISTRY_VECTOR_DIM} little-endian int16), "
                f"got {len(second_key)} bytes"
            )
        q2 = codes.second_key_from_bytes(second_key)
        snap = self._snapshot(name, model, CollectionKind.REGISTRY)
        return detect(snap, q1[0], q2, max_hamming, fallback_k, max_candidates)

    def similar(
        self,
        name: str,
        model: ModelRef,
        code: bytes,
        code_bits: int,
        fine: bytes,
        top_n: int,
    ) -> SimilarResult:
        """Top-n copyright-free items for a retrieval code (wire form)."""
        spec = self._require(name).spec
        _check_kind(spec, CollectionKind.COPYRIGHT_FREE)
        _check_model(spec, model)
        if code_bits != spec.code_bits:
            raise InvalidInput(
                f"query.code_bits is {code_bits} but collection {name!r} holds "
                f"{spec.code_bits}-bit codes"
            )
        q = codes.to_words(codes.check_packed(code, spec.code_bits, "query.code"))
        if len(fine) != spec.vector_dim:
            raise InvalidInput(
                f"query.fine must be {spec.vector_dim} bytes (int8) for collection "
                f"{name!r}, got {len(fine)} bytes"
            )
        q_fine = np.frombuffer(fine, dtype=np.int8)
        snap = self._snapshot(name, model, CollectionKind.COPYRIGHT_FREE)
        return similar(snap, q[0], q_fine, top_n)

    def stats(self) -> list[CollectionStats]:
        return [
            CollectionStats(c.spec, c.live, c.tombstones, c.memory_bytes)
            for _, c in sorted(self._collections.items())
        ]

    def _get_or_create(self, spec: CollectionSpec) -> CollectionIndex:
        coll = self._collections.get(spec.name)
        if coll is None:
            with self._lock:
                coll = self._collections.get(spec.name)
                if coll is None:
                    coll = self._collections[spec.name] = CollectionIndex(spec)
        return coll

    def _snapshot(self, name: str, model: ModelRef, kind: CollectionKind) -> Snapshot:
        coll = self._require(name)
        _check_kind(coll.spec, kind)
        _check_model(coll.spec, model)
        return coll.snapshot()

    def _require(self, name: str) -> CollectionIndex:
        coll = self._collections.get(name)
        if coll is None:
            raise NotFound(f"collection {name!r} does not exist in this shard")
        return coll


def _check_kind(spec: CollectionSpec, kind: CollectionKind) -> None:
    if spec.kind is not kind:
        raise FailedPrecondition(
            f"collection {spec.name!r} is a {spec.kind.label} collection; "
            f"this request needs a {kind.label} collection"
        )


def _check_model(spec: CollectionSpec, model: ModelRef) -> None:
    if spec.model != model:
        raise FailedPrecondition(
            f"collection {spec.name!r} holds keys of model {spec.model}, the request "
            f"uses model {model}; keys are only comparable under one model version"
        )
