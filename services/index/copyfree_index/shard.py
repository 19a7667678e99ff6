"""In-memory search state of one index shard: per collection, packed codes in contiguous
numpy arrays, exact two-stage Detect and tie-aware Similar. Pure: numpy only, no grpc,
no I/O.

Layout per collection (rows are append-only; capacity doubles):
- registry:       words (n, 1) uint64 = first keys (copyfree.codes.to_words),
                  vectors (n, 64) int16 = second keys
- copyright-free: words (n, W) uint64 = retrieval codes,
                  vectors (n, F) int8 = fine codes
- ids / metadata: Python lists by row; row_of: id -> live row; alive: (n,) bool.
A replace or delete marks the old row dead (a tombstone); nothing is rebuilt until
compaction (tombstones > half the rows), which copies the live rows into new arrays.

Concurrency: writers hold the shard lock. A search takes a snapshot (array views of the
first n rows, the alive mask, the id list) under the lock and searches without it. This
is safe because rows below n are never written again: appends go past n, growth and
compaction allocate new arrays, and the alive mask is copied before a tombstone is set.

The search itself lives in `detect()` / `similar()` over a `Snapshot`, so a faster
algorithm (multi-index hashing) can replace it without touching the rest.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

from copyfree import codes, hamming
from copyfree.errors import FailedPrecondition, InvalidInput, NotFound

REGISTRY_CODE_BITS = codes.FIRST_KEY_BITS  # first keys: 64 bits
REGISTRY_VECTOR_DIM = codes.EMBEDDING_DIM  # second keys: 64 int16
_INITIAL_CAPACITY = 256
_DEAD = np.int32(1 << 20)  # distance given to tombstoned rows: beyond any real one


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


class Metadata(NamedTuple):
    """Descriptive metadata of one item (a tuple: cheap to build by the million)."""

    title: str = ""
    owner: str = ""
    licence: str = ""
    source: str = ""

    def to_list(self) -> list[str]:
        """[title, owner, licence, source] without trailing empty fields (the
        store's compact JSON form)."""
        values = list(self)
        while values and not values[-1]:
            values.pop()
        return values

    @classmethod
    def from_list(cls, values: Sequence[str]) -> Metadata:
        return cls(*values[:4]) if values else EMPTY_METADATA


EMPTY_METADATA = Metadata()


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
    """Items to insert or replace: codes (n, code_bytes) uint8 packed MSB-first and
    vectors (n, vector_dim) int16 (second keys) or int8 (fine codes), row-aligned."""

    ids: list[str]
    codes: NDArray[np.uint8]
    vectors: NDArray[Any]
    metadata: list[Metadata]

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

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class DetectHit:
    id: str
    hamming: int
    cosine: float  # float32 precision: the order and the wire agree
    metadata: Metadata


@dataclass(frozen=True)
class DetectResult:
    candidates: list[DetectHit]  # stage 1, by (cosine desc, id asc), capped
    stage1_count: int  # all stage-1 hits before the cap
    nearest: list[DetectHit]  # only when stage1_count == 0: by (hamming, id)
    searched: int  # live items searched


@dataclass(frozen=True)
class SimilarHit:
    id: str
    hamming: int
    fine_cosine: float
    metadata: Metadata


@dataclass(frozen=True)
class SimilarResult:
    hits: list[SimilarHit]  # by (hamming asc, fine_cosine desc, id asc)
    searched: int


@dataclass(frozen=True)
class CollectionStats:
    spec: CollectionSpec
    items: int
    tombstones: int
    memory_bytes: int


@dataclass(frozen=True)
class Snapshot:
    """Consistent read-only view of a collection's first n rows."""

    words: NDArray[np.uint64]  # (n, W)
    vectors: NDArray[Any]  # (n, D)
    alive: NDArray[np.bool_]  # (n,)
    ids: list[str]  # at least n entries; only the first n are part of the view
    metadata: list[Metadata]
    live: int

    @property
    def tombstones(self) -> int:
        return int(self.alive.shape[0]) - self.live


# --------------------------------------------------------------------------- searches


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
    d = _live_distances(snap, first_key)
    rows = np.flatnonzero(d <= max_hamming)
    if rows.size:
        cos = _cosine32(snap.vectors[rows], second_key)
        picked = _first_ordered((-cos,), rows, snap.ids, max_candidates)
        hits = [
            _detect_hit(snap, int(rows[p]), int(d[rows[p]]), float(cos[p]))
            for p in picked
        ]
        return DetectResult(hits, int(rows.size), [], snap.live)
    nearest: list[DetectHit] = []
    if fallback_k > 0 and snap.live:
        rows = hamming.nearest_rows(d, fallback_k)
        rows = rows[snap.alive[rows]]
        picked = _first_ordered((d[rows],), rows, snap.ids, fallback_k)
        cos = _cosine32(snap.vectors[rows[picked]], second_key)
        nearest = [
            _detect_hit(snap, int(rows[p]), int(d[rows[p]]), float(c))
            for p, c in zip(picked, cos, strict=True)
        ]
    return DetectResult([], 0, nearest, snap.live)


def similar(
    snap: Snapshot, code: NDArray[np.uint64], fine: NDArray[np.int8], top_n: int
) -> SimilarResult:
    """Exact top_n live rows by (hamming asc, fine cosine desc, id asc)."""
    d = _live_distances(snap, code)
    rows = hamming.nearest_rows(d, top_n)  # every row tied with the n-th distance
    rows = rows[snap.alive[rows]]
    cos = _cosine32(snap.vectors[rows], fine)
    picked = _first_ordered((d[rows], -cos), rows, snap.ids, top_n)
    hits = [
        SimilarHit(
            snap.ids[int(rows[p])],
            int(d[rows[p]]),
            float(cos[p]),
            snap.metadata[int(rows[p])],
        )
        for p in picked
    ]
    return SimilarResult(hits, snap.live)


def _live_distances(snap: Snapshot, query: NDArray[np.uint64]) -> NDArray[np.int32]:
    d = hamming.distances(snap.words, query)
    if snap.tombstones:
        d[~snap.alive] = _DEAD
    return d


def _cosine32(vectors: NDArray[Any], query: NDArray[Any]) -> NDArray[np.float32]:
    """Cosines rounded to float32 before ordering, so the order a shard uses is the
    order the float32 values on the wire imply (the gateway merges on those)."""
    return codes.cosine(vectors, query).astype(np.float32)


def _first_ordered(
    keys: Sequence[NDArray[Any]], rows: NDArray[np.int64], ids: list[str], limit: int
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
                    result[a : b + 1], key=lambda p: ids[rows[p]]
                )
    return result[:limit]


def _detect_hit(snap: Snapshot, row: int, dist: int, cos: float) -> DetectHit:
    return DetectHit(snap.ids[row], dist, cos, snap.metadata[row])


# ------------------------------------------------------------------ one collection


class CollectionIndex:
    """Rows of one collection. Not thread-safe by itself: ShardIndex holds the lock."""

    def __init__(self, spec: CollectionSpec, capacity: int = _INITIAL_CAPACITY) -> None:
        self.spec = spec
        capacity = max(1, capacity)
        self._words = np.zeros(
            (capacity, codes.words_per_code(spec.code_bits)), np.uint64
        )
        self._vectors = np.zeros((capacity, spec.vector_dim), spec.vector_dtype)
        self._alive = np.zeros(capacity, dtype=bool)
        self._ids: list[str] = []
        self._metadata: list[Metadata] = []
        self._row_of: dict[str, int] = {}
        self._n = 0

    @property
    def rows(self) -> int:
        return self._n

    @property
    def live(self) -> int:
        return len(self._row_of)

    @property
    def tombstones(self) -> int:
        return self._n - len(self._row_of)

    @property
    def capacity(self) -> int:
        return int(self._words.shape[0])

    @property
    def memory_bytes(self) -> int:
        return int(self._words.nbytes + self._vectors.nbytes + self._alive.nbytes)

    def needs_compaction(self) -> bool:
        return 2 * self.tombstones > self._n

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._row_of

    def upsert(self, batch: ItemBatch) -> int:
        """Append rows; an id that was live is replaced (old row tombstoned). Returns
        how many ids were replaced."""
        k = len(batch)
        self._check_shapes(batch)
        if k == 0:
            return 0
        start = self._n
        self._ensure_capacity(start + k)
        replaced: list[int] = []  # rows of earlier batches: tombstones
        repeated: list[int] = []  # an id twice in this batch: the last copy wins
        for i, item_id in enumerate(batch.ids):
            old = self._row_of.get(item_id)
            if old is not None:
                (replaced if old < start else repeated).append(old)
            self._row_of[item_id] = start + i
        if replaced:
            self._tombstone(replaced)
        self._words[start : start + k] = codes.to_words(batch.codes)
        self._vectors[start : start + k] = batch.vectors
        self._alive[start : start + k] = True  # rows past n: in no snapshot yet
        self._alive[repeated] = False
        self._ids.extend(batch.ids)
        self._metadata.extend(batch.metadata)
        self._n = start + k  # publish last
        return len(replaced)

    def delete(self, ids: Iterable[str]) -> tuple[list[str], list[str]]:
        """Tombstone live ids. Returns (deleted, missing), each in request order."""
        deleted, missing, rows = [], [], []
        for item_id in ids:
            row = self._row_of.pop(item_id, None)
            if row is None:
                missing.append(item_id)
            else:
                deleted.append(item_id)
                rows.append(row)
        if rows:
            self._tombstone(rows)
        return deleted, missing

    def snapshot(self) -> Snapshot:
        n = self._n
        return Snapshot(
            self._words[:n],
            self._vectors[:n],
            self._alive[:n],
            self._ids,
            self._metadata,
            len(self._row_of),
        )

    def live_batch(self) -> ItemBatch:
        """The live rows, in row order, as one batch (for a store snapshot)."""
        rows = np.flatnonzero(self._alive[: self._n])
        packed = np.ascontiguousarray(self._words[rows]).view(np.uint8)
        return ItemBatch(
            [self._ids[r] for r in rows.tolist()],
            np.ascontiguousarray(packed[:, : self.spec.code_bytes]),
            self._vectors[rows].copy(),
            [self._metadata[r] for r in rows.tolist()],
        )

    def compact(self) -> None:
        """Copy the live rows into new arrays (old snapshots keep the old ones)."""
        rows = np.flatnonzero(self._alive[: self._n])
        n = int(rows.size)
        capacity = max(_INITIAL_CAPACITY, 1 << max(0, (n - 1)).bit_length())
        words = np.zeros((capacity, self._words.shape[1]), np.uint64)
        vectors = np.zeros((capacity, self.spec.vector_dim), self.spec.vector_dtype)
        alive = np.zeros(capacity, dtype=bool)
        words[:n] = self._words[rows]
        vectors[:n] = self._vectors[rows]
        alive[:n] = True
        row_list = rows.tolist()
        self._ids = [self._ids[r] for r in row_list]
        self._metadata = [self._metadata[r] for r in row_list]
        self._row_of = {item_id: i for i, item_id in enumerate(self._ids)}
        self._words, self._vectors, self._alive, self._n = words, vectors, alive, n

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

    def _tombstone(self, rows: list[int]) -> None:
        alive = self._alive.copy()  # copy-on-write: snapshots keep their mask
        alive[rows] = False
        self._alive = alive


# ------------------------------------------------------------------------ the shard


class ShardIndex:
    """All collections of one shard. Thread-safe: writes lock, searches snapshot."""

    def __init__(self) -> None:
        self._collections: dict[str, CollectionIndex] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._collections)

    def spec(self, name: str) -> CollectionSpec | None:
        with self._lock:
            coll = self._collections.get(name)
            return coll.spec if coll else None

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
        with self._lock:
            coll = self._collections.get(spec.name)
            if coll is None:
                coll = self._collections[spec.name] = CollectionIndex(spec)
            replaced = coll.upsert(batch)
        return len(batch), replaced

    def present(self, name: str, ids: Sequence[str]) -> list[str]:
        """The ids (in order) that are live in the collection."""
        with self._lock:
            coll = self._require(name)
            return [i for i in ids if i in coll]

    def delete(self, name: str, ids: Sequence[str]) -> tuple[list[str], list[str]]:
        """Returns (deleted, missing)."""
        with self._lock:
            return self._require(name).delete(ids)

    def needs_compaction(self, name: str) -> bool:
        with self._lock:
            coll = self._collections.get(name)
            return coll is not None and coll.needs_compaction()

    def live_batch(self, name: str) -> ItemBatch:
        with self._lock:
            return self._require(name).live_batch()

    def compact(self, name: str) -> None:
        with self._lock:
            self._require(name).compact()

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
        with self._lock:
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
        with self._lock:
            return [
                CollectionStats(c.spec, c.live, c.tombstones, c.memory_bytes)
                for _, c in sorted(self._collections.items())
            ]

    def _snapshot(self, name: str, model: ModelRef, kind: CollectionKind) -> Snapshot:
        with self._lock:
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
