"""IndexServicer: the gRPC surface of one shard (copyfree.v1.IndexService).

Validates requests, writes every change to the store *before* applying it to memory
(so an acknowledged item is always in Redis, and a failed write changes nothing), and
runs CPU work in threads. Raises copyfree.errors.*; the interceptor maps them.

Upsert receives the request's raw bytes (the wire contract is unchanged): the common
case is read column-wise by copyfree_index.wire, without a Python object per item;
anything the fast path declines, and every invalid request, goes through protobuf and
the per-field checks below, so error messages are the same either way.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
import re
from collections.abc import Sequence

import grpc
import numpy as np
from numpy.typing import NDArray

from copyfree import codes, routing
from copyfree.errors import FailedPrecondition, InvalidInput, Unavailable
from copyfree.serving import ServicerContext
from copyfree.serving.metrics import INDEX_COLLECTION_MODEL, INDEX_ITEMS
from copyfree.serving.server import Service
from copyfree.v1 import common_pb2, index_pb2, index_pb2_grpc
from copyfree_index import INDEX_SERVICE_NAME
from copyfree_index.ragged import Ragged, hash_items
from copyfree_index.settings import MAX_CANDIDATES_LIMIT, IndexSettings
from copyfree_index.shard import (
    CollectionKind,
    CollectionSpec,
    DetectHit,
    ItemBatch,
    ModelRef,
    ShardIndex,
)
from copyfree_index.store import LoadReport, ShardStore
from copyfree_index.wire import UpsertColumns, parse_upsert

log = logging.getLogger(__name__)

MAX_ITEMS_PER_REQUEST = 10_000
MAX_ID_CHARS = routing.MAX_ID_CHARS
MAX_COLLECTION_CHARS = 128
MAX_HAMMING = codes.FIRST_KEY_BITS
MAX_TOP_N = 1000
MAX_FALLBACK_K = 1000
MAX_FINE_BYTES = 4096
_COLLECTION_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
_KIND_NAMES = ", ".join(
    common_pb2.CollectionKind.Name(k) for k in (k.value for k in CollectionKind)
)

assert (
    INDEX_SERVICE_NAME
    == index_pb2.DESCRIPTOR.services_by_name["IndexService"].full_name
)


class IndexServicer(index_pb2_grpc.IndexServiceServicer):
    """Serves one shard. Unavailable until `load()` has replayed the store."""

    def __init__(
        self, shard: ShardIndex, store: ShardStore, settings: IndexSettings
    ) -> None:
        self._shard, self._store, self._settings = shard, store, settings
        self._ready = False
        # One lock per collection: the store's log order is the memory order.
        self._locks: dict[str, asyncio.Lock] = {}
        # Background compactions, one per collection at a time (strong references).
        self._compacting: dict[str, asyncio.Task[None]] = {}

    @property
    def ready(self) -> bool:
        return self._ready

    async def load(self, *, freeze_gc: bool = False) -> LoadReport:
        """Replay the store into memory, compact what needs it, then accept requests.

        freeze_gc=True (the service main) moves everything loaded into the GC's
        permanent generation, so full collections while serving skip millions of
        objects; tests leave it off."""
        report = await asyncio.to_thread(
            _load_without_gc, self._store, self._shard, freeze_gc
        )
        for name in self._shard.names():
            await self._compact_if_needed(name)
            self._export_count(name)
        log.info(
            "shard %d/%d loaded: %d collections, %d items, %d tombstones, "
            "%d segments in %.2fs",
            self._settings.shard_id,
            self._settings.num_shards,
            report.collections,
            report.items,
            report.tombstones,
            report.segments,
            report.seconds,
        )
        self._ready = True
        return report

    # ------------------------------------------------------------------ writes

    async def Upsert(
        self, request: bytes | index_pb2.UpsertRequest, context: ServicerContext
    ) -> index_pb2.UpsertResponse:
        self._require_ready()
        if isinstance(request, bytes):
            prepared = await asyncio.to_thread(self._prepare_raw, request)
        else:
            prepared = await asyncio.to_thread(self._prepare, request)
        if prepared is None:
            return index_pb2.UpsertResponse()
        spec, batch = prepared
        # Shielded: a client that cancels mid-write must not leave an item in the
        # store but not in memory; the write and the apply finish together.
        upserted, replaced = await asyncio.shield(self._upsert(spec, batch))
        return index_pb2.UpsertResponse(upserted=upserted, replaced=replaced)

    def _prepare_raw(self, raw: bytes) -> tuple[CollectionSpec, ItemBatch] | None:
        """Fast path when the bytes are ordinary and valid; else protobuf."""
        cols = parse_upsert(raw)
        if cols is not None:
            prepared = self._fast_batch(cols)
            if prepared is not None:
                return prepared
        return self._prepare(index_pb2.UpsertRequest.FromString(raw))

    def _fast_batch(
        self, cols: UpsertColumns
    ) -> tuple[CollectionSpec, ItemBatch] | None:
        """None unless every check passes (the slow path then names the problem)."""
        n = cols.count
        if n == 0 or n > MAX_ITEMS_PER_REQUEST:
            return None
        try:
            name = _check_collection(cols.collection.decode())
            kind = _check_kind(cols.kind)
            model = _check_model(common_pb2.ModelRef.FromString(cols.model))
        except (InvalidInput, ValueError):
            return None
        chars = cols.ids.char_counts()
        if chars.min() < 1 or chars.max() > MAX_ID_CHARS:
            return None
        if _has_repeats(cols.ids):
            return None
        if self._settings.num_shards > 1 and np.any(
            _owners(cols.ids, self._settings.num_shards) != self._settings.shard_id
        ):
            return None
        if kind is CollectionKind.REGISTRY:
            spec = CollectionSpec.registry(name, model)
            first, second = cols.first_key, cols.second_key
            if np.any(first[1] != spec.code_bytes) or np.any(
                second[1] != 2 * spec.vector_dim
            ):
                return None
            codes_ = cols.gather(first, spec.code_bytes)
            raw_vectors = cols.gather(second, 2 * spec.vector_dim)
            vectors = raw_vectors.view("<i2").astype(np.int16, copy=False)
        else:
            bits = int(cols.code_bits[0])
            if bits not in codes.SUPPORTED_CODE_BITS:
                return None
            fine_len = int(cols.fine[1][0])
            if fine_len > MAX_FINE_BYTES or np.any(cols.code_bits != bits):
                return None
            spec = CollectionSpec(name, kind, model, bits, fine_len)
            if np.any(cols.code[1] != spec.code_bytes) or np.any(
                cols.fine[1] != fine_len
            ):
                return None
            codes_ = cols.gather(cols.code, spec.code_bytes)
            vectors = cols.gather(cols.fine, fine_len).view(np.int8)
        batch = ItemBatch(
            cols.ids, codes_, vectors.reshape(n, spec.vector_dim), cols.metadata
        )
        return spec, batch

    def _prepare(
        self, request: index_pb2.UpsertRequest
    ) -> tuple[CollectionSpec, ItemBatch] | None:
        name = _check_collection(request.collection)
        kind = _check_kind(request.kind)
        model = _check_model(request.model)
        items = request.items
        if len(items) > MAX_ITEMS_PER_REQUEST:
            raise InvalidInput(
                f"items: at most {MAX_ITEMS_PER_REQUEST} per request, got {len(items)}"
            )
        if not items:
            return None
        ids = [item.id for item in items]
        self._check_ids(ids, "items[{i}].id")
        seen: set[str] = set()
        for i, item_id in enumerate(ids):
            if item_id in seen:
                raise InvalidInput(f"items[{i}].id {item_id!r} appears twice")
            seen.add(item_id)
        spec = _requested_spec(name, kind, model, items)
        return spec, _build_batch(spec, items)

    async def _upsert(self, spec: CollectionSpec, batch: ItemBatch) -> tuple[int, int]:
        async with self._lock(spec.name):
            self._shard.check_upsert(spec)
            await asyncio.to_thread(self._store.append_upsert, spec, batch)
            result = await asyncio.to_thread(self._shard.upsert, spec, batch)
        self._after_write(spec.name)
        return result

    async def Delete(
        self, request: index_pb2.DeleteRequest, context: ServicerContext
    ) -> index_pb2.DeleteResponse:
        self._require_ready()
        name = _check_collection(request.collection)
        given = list(request.ids)
        if len(given) > MAX_ITEMS_PER_REQUEST:
            raise InvalidInput(
                f"ids: at most {MAX_ITEMS_PER_REQUEST} per request, got {len(given)}"
            )
        self._check_ids(given, "ids[{i}]")
        ids = list(dict.fromkeys(given))  # drop repeats, keep order
        deleted, missing = await asyncio.shield(self._delete(name, ids))
        return index_pb2.DeleteResponse(deleted=len(deleted), missing_ids=missing)

    async def _delete(self, name: str, ids: list[str]) -> tuple[list[str], list[str]]:
        async with self._lock(name):
            present = self._shard.present(name, ids)  # NotFound: unknown collection
            spec = self._shard.spec(name)
            if present and spec is not None:
                await asyncio.to_thread(self._store.append_delete, spec, present)
            result = self._shard.delete(name, ids)
        self._after_write(name)
        return result

    # ---------------------------------------------------------------- searches

    async def Detect(
        self, request: index_pb2.DetectRequest, context: ServicerContext
    ) -> index_pb2.DetectResponse:
        self._require_ready()
        name = _check_collection(request.collection)
        model = _check_model(request.model)
        if request.max_hamming > MAX_HAMMING:
            raise InvalidInput(
                f"max_hamming must be in [0, {MAX_HAMMING}], got {request.max_hamming}"
            )
        if request.fallback_k > MAX_FALLBACK_K:
            raise InvalidInput(
                f"fallback_k must be in [0, {MAX_FALLBACK_K}], got {request.fallback_k}"
            )
        if request.max_candidates > MAX_CANDIDATES_LIMIT:
            raise InvalidInput(
                f"max_candidates must be in [0, {MAX_CANDIDATES_LIMIT}], "
                f"got {request.max_candidates}"
            )
        result = await asyncio.to_thread(
            self._shard.detect,
            name,
            model,
            request.query.first_key,
            request.query.second_key,
            request.max_hamming,
            request.fallback_k,
            request.max_candidates or self._settings.max_candidates,
        )
        return index_pb2.DetectResponse(
            candidates=[_candidate(h) for h in result.candidates],
            stage1_count=result.stage1_count,
            nearest=[_candidate(h) for h in result.nearest],
            shard_id=self._settings.shard_id,
            searched=result.searched,
        )

    async def Similar(
        self, request: index_pb2.SimilarRequest, context: ServicerContext
    ) -> index_pb2.SimilarResponse:
        self._require_ready()
        name = _check_collection(request.collection)
        model = _check_model(request.model)
        if not 1 <= request.top_n <= MAX_TOP_N:
            raise InvalidInput(
                f"top_n must be in [1, {MAX_TOP_N}], got {request.top_n}"
            )
        q = request.query
        _check_code_bits(q.code_bits, "query.code_bits")
        result = await asyncio.to_thread(
            self._shard.similar, name, model, q.code, q.code_bits, q.fine, request.top_n
        )
        return index_pb2.SimilarResponse(
            hits=[
                index_pb2.SimilarHit(
                    id=h.id,
                    hamming=h.hamming,
                    fine_cosine=h.fine_cosine,
                    metadata=common_pb2.WorkMetadata.FromString(h.metadata_raw),
                )
                for h in result.hits
            ],
            shard_id=self._settings.shard_id,
            searched=result.searched,
        )

    async def Stats(
        self, request: index_pb2.StatsRequest, context: ServicerContext
    ) -> index_pb2.StatsResponse:
        return index_pb2.StatsResponse(
            shard_id=self._settings.shard_id,
            num_shards=self._settings.num_shards,
            ready=self._ready,
            collections=[
                index_pb2.CollectionStats(
                    name=s.spec.name,
                    kind=s.spec.kind.value,  # type: ignore[arg-type]
                    model=common_pb2.ModelRef(
                        name=s.spec.model.name, version=s.spec.model.version
                    ),
                    items=s.items,
                    tombstones=s.tombstones,
                    memory_bytes=s.memory_bytes,
                    code_bits=s.spec.code_bits,
                )
                for s in self._shard.stats()
            ],
        )

    # ----------------------------------------------------------------- helpers

    def _require_ready(self) -> None:
        if not self._ready:
            raise Unavailable(
                f"index shard {self._settings.shard_id} is not ready: "
                "still loading from the store"
            )

    def _check_ids(self, ids: Sequence[str], field: str) -> None:
        shard_id, num_shards = self._settings.shard_id, self._settings.num_shards
        for i, item_id in enumerate(ids):
            if not 1 <= len(item_id) <= MAX_ID_CHARS:
                raise InvalidInput(
                    f"{field.format(i=i)} must be 1..{MAX_ID_CHARS} characters, "
                    f"got {len(item_id)}"
                )
            owner = routing.shard_for(item_id, num_shards)
            if owner != shard_id:
                raise FailedPrecondition(
                    f"{field.format(i=i)} {item_id!r} belongs to shard {owner}, "
                    f"this is shard {shard_id} of {num_shards}"
                )

    def _lock(self, name: str) -> asyncio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        return lock

    def _after_write(self, name: str) -> None:
        """Metrics, and a compaction in the background when tombstones outnumber
        half the rows: the write that crossed the line is acknowledged at once;
        the rewrite then takes the collection's write lock like any write."""
        self._export_count(name)
        if self._shard.needs_compaction(name) and name not in self._compacting:
            self._compacting[name] = asyncio.create_task(self._compact_later(name))

    async def _compact_later(self, name: str) -> None:
        try:
            async with self._lock(name):
                await self._compact_if_needed(name)
        finally:
            self._compacting.pop(name, None)
        self._export_count(name)

    async def compactions_done(self) -> None:
        """Wait for background compactions (tests; a clean shutdown)."""
        while self._compacting:
            await asyncio.gather(*self._compacting.values(), return_exceptions=True)

    async def _compact_if_needed(self, name: str) -> None:
        """Rewrite the log (then memory) once tombstones outnumber half the rows.

        A failure leaves both as they were (the store's rewrite is atomic): it is
        logged and retried after the next write."""
        if not self._shard.needs_compaction(name):
            return
        spec = self._shard.spec(name)
        if spec is None:
            return
        live = await asyncio.to_thread(self._shard.live_batch, name)
        try:
            await asyncio.to_thread(self._store.compact, spec, live)
        except Exception:
            log.exception("compaction of collection %r failed; will retry", name)
            return
        await asyncio.to_thread(self._shard.compact, name)
        log.info("compacted collection %r to %d live items", name, len(live))

    def _export_count(self, name: str) -> None:
        for s in self._shard.stats():
            if s.spec.name == name:
                INDEX_ITEMS.labels(str(self._settings.shard_id), name).set(s.items)
                INDEX_COLLECTION_MODEL.labels(
                    str(self._settings.shard_id), name, s.spec.model.name,
                    s.spec.model.version,
                ).set(1)  # fmt: skip


def _load_without_gc(store: ShardStore, shard: ShardIndex, freeze: bool) -> LoadReport:
    """Replay with the cyclic GC paused: millions of small objects and no cycles, so
    the collector would only rescan them (it made loading ~1.7x slower)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return store.load(shard)
    finally:
        if enabled:
            gc.enable()
        if freeze:
            gc.freeze()


def as_service(servicer: IndexServicer) -> Service:
    return Service(INDEX_SERVICE_NAME, add_to_server, servicer)


def add_to_server(servicer: IndexServicer, server: grpc.aio.Server) -> None:
    """Like the generated add_IndexServiceServicer_to_server, except that Upsert gets
    the request bytes (same wire contract; see the module docstring)."""
    methods = {
        "Upsert": grpc.unary_unary_rpc_method_handler(
            servicer.Upsert,
            request_deserializer=None,
            response_serializer=index_pb2.UpsertResponse.SerializeToString,
        )
    }
    for name, request, response in (
        ("Delete", index_pb2.DeleteRequest, index_pb2.DeleteResponse),
        ("Detect", index_pb2.DetectRequest, index_pb2.DetectResponse),
        ("Similar", index_pb2.SimilarRequest, index_pb2.SimilarResponse),
        ("Stats", index_pb2.StatsRequest, index_pb2.StatsResponse),
    ):
        methods[name] = grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name),
            request_deserializer=request.FromString,
            response_serializer=response.SerializeToString,
        )
    handler = grpc.method_handlers_generic_handler(INDEX_SERVICE_NAME, methods)
    server.add_generic_rpc_handlers((handler,))
    server.add_registered_method_handlers(INDEX_SERVICE_NAME, methods)


def _has_repeats(ids: Ragged) -> bool:
    """Whether an id occurs twice (equal hashes are confirmed by the slow path)."""
    hashes = hash_items(ids)
    return int(np.unique(hashes).size) != hashes.size


def _owners(ids: Ragged, num_shards: int) -> NDArray[np.uint64]:
    """routing.shard_for for every id (same blake2b digest, read as big-endian)."""
    digests = b"".join(
        hashlib.blake2b(b, digest_size=8).digest() for b in ids.to_bytes()
    )
    return np.frombuffer(digests, ">u8") % np.uint64(num_shards)


# --------------------------------------------------------------- request parsing


def _check_collection(name: str) -> str:
    if not _COLLECTION_RE.fullmatch(name):
        raise InvalidInput(
            f"collection must be 1..{MAX_COLLECTION_CHARS} characters of "
            f"[A-Za-z0-9._-], got {name[:140]!r}"
        )
    return name


def _check_kind(kind: int) -> CollectionKind:
    try:
        return CollectionKind(kind)
    except ValueError:
        raise InvalidInput(f"kind must be one of {_KIND_NAMES}, got {kind}") from None


def _check_model(model: common_pb2.ModelRef) -> ModelRef:
    if not model.name:
        raise InvalidInput("model.name is required")
    if not model.version:
        raise InvalidInput("model.version is required")
    return ModelRef(model.name, model.version)


def _check_code_bits(bits: int, field: str) -> None:
    if bits not in codes.SUPPORTED_CODE_BITS:
        raise InvalidInput(f"{field} must be a multiple of 8 in 8..256, got {bits}")


def _requested_spec(
    name: str,
    kind: CollectionKind,
    model: ModelRef,
    items: Sequence[index_pb2.IndexItem],
) -> CollectionSpec:
    if kind is CollectionKind.REGISTRY:
        return CollectionSpec.registry(name, model)
    first = items[0].code
    _check_code_bits(first.code_bits, "items[0].code.code_bits")
    if len(first.fine) > MAX_FINE_BYTES:
        raise InvalidInput(
            f"items[0].code.fine must be at most {MAX_FINE_BYTES} bytes, "
            f"got {len(first.fine)}"
        )
    return CollectionSpec(name, kind, model, first.code_bits, len(first.fine))


def _build_batch(
    spec: CollectionSpec, items: Sequence[index_pb2.IndexItem]
) -> ItemBatch:
    """Proto items -> ItemBatch, checking every key's length (names the field)."""
    n = len(items)
    if spec.kind is CollectionKind.REGISTRY:
        first = [it.keys.first_key for it in items]
        second = [it.keys.second_key for it in items]
        _check_lengths(
            first, spec.code_bytes, "items[{i}].keys.first_key", "bytes (64 bits)"
        )
        _check_lengths(
            second,
            2 * spec.vector_dim,
            "items[{i}].keys.second_key",
            "bytes (64 int16)",
        )
        vectors: np.ndarray = np.frombuffer(b"".join(second), "<i2").astype(np.int16)
    else:
        for i, it in enumerate(items):
            if it.code.code_bits != spec.code_bits:
                raise InvalidInput(
                    f"items[{i}].code.code_bits is {it.code.code_bits}, "
                    f"expected {spec.code_bits} like items[0]"
                )
        first = [it.code.code for it in items]
        fine = [it.code.fine for it in items]
        _check_lengths(first, spec.code_bytes, "items[{i}].code.code", "bytes")
        _check_lengths(fine, spec.vector_dim, "items[{i}].code.fine", "bytes (int8)")
        vectors = np.frombuffer(b"".join(fine), np.int8).copy()
    packed = np.frombuffer(b"".join(first), np.uint8).reshape(n, spec.code_bytes)
    return ItemBatch(
        Ragged.from_strings([it.id for it in items]),
        packed.copy(),
        vectors.reshape(n, spec.vector_dim),
        Ragged.from_bytes([it.metadata.SerializeToString() for it in items]),
    )


def _check_lengths(values: list[bytes], want: int, field: str, unit: str) -> None:
    for i, v in enumerate(values):
        if len(v) != want:
            raise InvalidInput(
                f"{field.format(i=i)} must be {want} {unit}, got {len(v)}"
            )


def _candidate(h: DetectHit) -> index_pb2.DetectCandidate:
    return index_pb2.DetectCandidate(
        id=h.id,
        hamming=h.hamming,
        cosine=h.cosine,
        metadata=common_pb2.WorkMetadata.FromString(h.metadata_raw),
    )
