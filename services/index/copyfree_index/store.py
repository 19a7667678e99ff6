"""Durable record of one shard: append-only binary segments per collection in Redis.

Redis layout (API version in the key; one hash tag per (collection, shard) so Redis
Cluster can spread collections and shards while each one's keys share a slot):

    copyfree:v1:{<collection>:<shard>}:meta   HASH  format, kind, model_name,
                                                    model_version, code_bits, fine_dim,
                                                    rows [, shards]
    copyfree:v1:{<collection>:<shard>}:log    LIST  binary segments, oldest first
    copyfree:v1:collections:<shard>           SET   collection names of the shard

One Upsert or Delete = one MULTI/EXEC (HSET meta + HINCRBY rows + RPUSH one segment),
done before the RPC is acknowledged. `rows` counts the upserted rows in the log, so a
restart sizes its arrays once: it reads every segment in order (LRANGE in ~32 MB
chunks), copies each into those arrays and drops it, then builds the id map and the
hash tables in a few passes (CollectionIndex.from_log); logs without `rows` load the
same, growing the arrays. Compaction replaces the log by snapshot segments of the live
rows in one MULTI/EXEC (DEL + RPUSH, rows reset), so a reader sees either the old log
or the new one. `shards`, when
present, is the shard count the data was partitioned for (written by the
re-sharding command); a shard configured for another count refuses to load.

Why a list of columnar segments: the load path is one LRANGE reply per ~32 MB and
numpy views into it (~2-3M rows/s measured with the parsing and tables included),
where one Redis hash per item loads at ~30k items/s (docs/benchmarks.md).

Segment format, version 2 (all integers little-endian):

    offset  size  field
    0       4     magic b"CFSG"
    4       1     format version = 2
    5       1     op: 1 = upsert (rows to insert or replace), 2 = delete (tombstones)
    6       1     vector element size in bytes: 2 = int16 (registry second keys),
                  1 = int8 (copyright-free fine codes), 0 = no vectors (delete)
    7       1     reserved, 0
    8       4     count: rows (upsert) or ids (delete)
    12      2     code_bytes: bytes per packed code (8 for first keys; 0 for delete)
    14      2     vector_dim: vector elements per row (0 for delete)
    16      4     id_bytes: total UTF-8 bytes of the ids
    20      4     meta_bytes: total bytes of the metadata records (0 for delete)
    24            codes: count * code_bytes bytes, packed MSB-first as on the wire
                  vectors: count * vector_dim * element size bytes
                  id lengths: count * uint16
                  metadata lengths: count * uint32 (upsert only)
                  ids: id_bytes of UTF-8, concatenated
                  metadata: meta_bytes, one copyfree.v1.WorkMetadata message
                        (protobuf wire form) per row, concatenated

Version 1 (JSON ids and metadata after the vectors) is still read. Replay is
idempotent per id (an upsert replaces, a delete of a dead id is a no-op), so a segment
written twice (a client retry after a lost reply) changes nothing. A reader refuses
segments of a newer format version instead of guessing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import redis
import redis.cluster

from copyfree.errors import FailedPrecondition, Unavailable
from copyfree_index.ragged import Metadata, Ragged
from copyfree_index.shard import (
    CollectionKind,
    CollectionSpec,
    Deletion,
    ItemBatch,
    ModelRef,
    Record,
    ShardIndex,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
MAGIC = b"CFSG"
OP_UPSERT, OP_DELETE = 1, 2
KEY_PREFIX = "copyfree:v1"
SNAPSHOT_ROWS_PER_SEGMENT = 10_000  # like the largest Upsert: segments stay ~MBs
LOAD_CHUNK_BYTES = 32 * 1024 * 1024  # target size of one LRANGE reply at load
MAX_ID_BYTES = 65_535
_HEADER_V1 = struct.Struct("<4sBBBBIHHI")
_HEADER = struct.Struct("<4sBBBBIHHII")
_KIND_NAMES = {
    CollectionKind.REGISTRY: "registry",
    CollectionKind.COPYRIGHT_FREE: "copyright_free",
}
_KINDS = {v: k for k, v in _KIND_NAMES.items()}


# ------------------------------------------------------------------------- segments


def encode_upsert(batch: ItemBatch) -> bytes:
    codes = np.ascontiguousarray(batch.codes, dtype=np.uint8)
    vectors = np.ascontiguousarray(batch.vectors)
    id_len = batch.ids.lengths()
    if id_len.size and int(id_len.max()) > MAX_ID_BYTES:
        raise ValueError(f"an id is longer than {MAX_ID_BYTES} bytes")
    header = _HEADER.pack(
        MAGIC,
        FORMAT_VERSION,
        OP_UPSERT,
        vectors.dtype.itemsize,
        0,
        len(batch),
        codes.shape[1],
        vectors.shape[1],
        batch.ids.nbytes,
        batch.metadata.nbytes,
    )
    return b"".join(
        (
            header,
            codes.tobytes(),
            vectors.astype(vectors.dtype.newbyteorder("<"), copy=False).tobytes(),
            id_len.astype("<u2").tobytes(),
            batch.metadata.lengths().astype("<u4").tobytes(),
            batch.ids.data[: batch.ids.nbytes].tobytes(),
            batch.metadata.data[: batch.metadata.nbytes].tobytes(),
        )
    )


def encode_delete(ids: Sequence[str] | Ragged) -> bytes:
    items = ids if isinstance(ids, Ragged) else Ragged.from_strings(list(ids))
    header = _HEADER.pack(
        MAGIC, FORMAT_VERSION, OP_DELETE, 0, 0, len(items), 0, 0, items.nbytes, 0
    )
    return b"".join(
        (
            header,
            items.lengths().astype("<u2").tobytes(),
            items.data[: items.nbytes].tobytes(),
        )
    )


def decode_segment(data: bytes, spec: CollectionSpec) -> Record:
    """One segment -> ItemBatch or Deletion (numpy views into `data`); checks it
    against the collection's spec."""
    if len(data) < _HEADER_V1.size:
        raise ValueError(f"segment of {len(data)} bytes is shorter than its header")
    magic, version = data[:4], data[4]
    if magic != MAGIC:
        raise ValueError(f"not a copyfree segment (magic {magic!r})")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"segment format version {version} is newer than this index reads "
            f"({FORMAT_VERSION}): upgrade the index before loading this data"
        )
    if version == 1:
        return _decode_v1(data, spec)
    if len(data) < _HEADER.size:
        raise ValueError(f"segment of {len(data)} bytes is shorter than its header")
    _, _, op, itemsize, _, count, code_bytes, dim, id_bytes, meta_bytes = (
        _HEADER.unpack_from(data)
    )
    offset = _HEADER.size
    if op == OP_DELETE:
        if len(data) != offset + 2 * count + id_bytes:
            raise ValueError(f"segment of {len(data)} bytes is truncated or padded")
        id_len = np.frombuffer(data, "<u2", count, offset)
        ids = np.frombuffer(data, np.uint8, id_bytes, offset + 2 * count)
        return Deletion(Ragged.from_lengths(ids, id_len))
    if op != OP_UPSERT:
        raise ValueError(f"unknown segment op {op}")
    dtype = _check_rows(spec, code_bytes, dim, itemsize)
    codes_len, vectors_len = count * code_bytes, count * dim * itemsize
    size = offset + codes_len + vectors_len + 6 * count + id_bytes + meta_bytes
    if len(data) != size:
        raise ValueError(f"segment of {len(data)} bytes is truncated or padded")
    codes = np.frombuffer(data, np.uint8, codes_len, offset).reshape(count, code_bytes)
    offset += codes_len
    vectors = np.frombuffer(data, dtype, count * dim, offset).reshape(count, dim)
    offset += vectors_len
    id_len = np.frombuffer(data, "<u2", count, offset)
    offset += 2 * count
    meta_len = np.frombuffer(data, "<u4", count, offset)
    offset += 4 * count
    ids = np.frombuffer(data, np.uint8, id_bytes, offset)
    meta = np.frombuffer(data, np.uint8, meta_bytes, offset + id_bytes)
    return ItemBatch(
        Ragged.from_lengths(ids, id_len),
        codes,
        vectors.astype(spec.vector_dtype, copy=False),
        Ragged.from_lengths(meta, meta_len),
    )


def _check_rows(
    spec: CollectionSpec, code_bytes: int, dim: int, itemsize: int
) -> np.dtype[Any]:
    dtype = spec.vector_dtype.newbyteorder("<")
    if (code_bytes, dim, itemsize) != (
        spec.code_bytes,
        spec.vector_dim,
        dtype.itemsize,
    ):
        raise ValueError(
            f"segment rows ({code_bytes} code bytes, {dim} x {itemsize}-byte vectors) "
            f"do not match collection {spec.name!r} ({spec.code_bytes} code bytes, "
            f"{spec.vector_dim} x {dtype.itemsize}-byte vectors)"
        )
    return dtype


def _decode_v1(data: bytes, spec: CollectionSpec) -> Record:
    """Format 1: the same header without meta_bytes, JSON ids and metadata."""
    _, _, op, itemsize, _, count, code_bytes, dim, json_len = _HEADER_V1.unpack_from(
        data
    )
    offset = _HEADER_V1.size
    if op == OP_DELETE:
        ids = json.loads(data[offset : offset + json_len])["ids"]
        if len(ids) != count:
            raise ValueError(f"delete segment says {count} ids, holds {len(ids)}")
        return Deletion(Ragged.from_strings(ids))
    if op != OP_UPSERT:
        raise ValueError(f"unknown segment op {op}")
    dtype = _check_rows(spec, code_bytes, dim, itemsize)
    codes_len, vectors_len = count * code_bytes, count * dim * itemsize
    if len(data) != offset + codes_len + vectors_len + json_len:
        raise ValueError(f"segment of {len(data)} bytes is truncated or padded")
    codes = np.frombuffer(data, np.uint8, codes_len, offset).reshape(count, code_bytes)
    offset += codes_len
    vectors = np.frombuffer(data, dtype, count * dim, offset).reshape(count, dim)
    offset += vectors_len
    body = json.loads(data[offset : offset + json_len])
    ids, metas = body["ids"], body["metadata"]
    if len(ids) != count or len(metas) != count:
        raise ValueError(f"upsert segment says {count} rows, holds {len(ids)} ids")
    return ItemBatch.of(
        ids,
        codes,
        vectors.astype(spec.vector_dtype, copy=False),
        [Metadata(*m[:4]) for m in metas],
    )


def snapshot_segments(batch: ItemBatch) -> list[bytes]:
    """The live rows of a collection as upsert segments of bounded size."""
    step = SNAPSHOT_ROWS_PER_SEGMENT
    return [
        encode_upsert(batch.slice(i, min(i + step, len(batch))))
        for i in range(0, len(batch), step)
    ]


def meta_fields(
    spec: CollectionSpec, shards: int | None = None, rows: int | None = None
) -> dict[str, str]:
    fields = {
        "format": str(FORMAT_VERSION),
        "kind": _KIND_NAMES[spec.kind],
        "model_name": spec.model.name,
        "model_version": spec.model.version,
        "code_bits": str(spec.code_bits),
        "fine_dim": str(spec.vector_dim),
    }
    if shards is not None:
        fields["shards"] = str(shards)
    if rows is not None:
        fields["rows"] = str(rows)
    return fields


def spec_from_meta(name: str, fields: dict[str, str]) -> CollectionSpec:
    return CollectionSpec(
        name,
        _KINDS[fields["kind"]],
        ModelRef(fields["model_name"], fields["model_version"]),
        int(fields["code_bits"]),
        int(fields["fine_dim"]),
    )


# ---------------------------------------------------------------------- the stores


@dataclass(frozen=True)
class LoadReport:
    collections: int
    segments: int
    items: int  # live items after replay
    tombstones: int
    seconds: float


class ShardStore(Protocol):
    """Where a shard's changes live. Every method is blocking; callers in the event loop
    use asyncio.to_thread. A method that returns has made its change durable enough to
    acknowledge (Redis: applied, and in the AOF within appendfsync's window)."""

    def ping(self) -> None:
        """Raise (any exception) unless the store answers."""

    def append_upsert(self, spec: CollectionSpec, batch: ItemBatch) -> None: ...

    def append_delete(self, spec: CollectionSpec, ids: Sequence[str]) -> None: ...

    def compact(self, spec: CollectionSpec, live: ItemBatch) -> None:
        """Replace the collection's log by `live` (its live rows), atomically."""

    def load(self, shard: ShardIndex) -> LoadReport:
        """Replay every collection of this shard into `shard`, in log order."""

    def close(self) -> None: ...


def replay_log(
    shard: ShardIndex,
    spec: CollectionSpec,
    segments: Iterable[bytes],
    rows_hint: int = 0,
) -> int:
    """Load a collection's log into `shard` while it is read, segment by segment
    (each is decoded, copied in and dropped). Returns the number of segments."""
    count = 0

    def records() -> Iterator[Record]:
        nonlocal count
        for data in segments:
            count += 1
            yield decode_segment(data, spec)

    shard.load_log(spec, records(), rows_hint)  # the collection exists even if emptied
    return count


def _report(shard: ShardIndex, segments: int, started: float) -> LoadReport:
    stats = shard.stats()
    return LoadReport(
        len(stats),
        segments,
        sum(s.items for s in stats),
        sum(s.tombstones for s in stats),
        time.perf_counter() - started,
    )


def _check_shards(name: str, fields: dict[str, str], shards: int | None) -> None:
    recorded = fields.get("shards")
    if shards is not None and recorded is not None and int(recorded) != shards:
        raise FailedPrecondition(
            f"collection {name!r} is partitioned for {recorded} shards in the store, "
            f"this shard is configured for {shards}: set INDEX_NUM_SHARDS={recorded} "
            "or re-shard (python -m copyfree_index.reshard)"
        )


class InMemoryShardStore:
    """The ShardStore contract without Redis (unit tests, and a dev mode that forgets
    everything on exit). Stores encoded segments, so the format is exercised too."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._meta: dict[str, dict[str, str]] = {}
        self._logs: dict[str, list[bytes]] = {}
        self.fail_writes = False  # tests: simulate an unreachable store

    def ping(self) -> None:
        if self.fail_writes:
            raise Unavailable("in-memory store is set to fail")

    def append_upsert(self, spec: CollectionSpec, batch: ItemBatch) -> None:
        self._write(spec, [encode_upsert(batch)] if len(batch) else [], len(batch))

    def append_delete(self, spec: CollectionSpec, ids: Sequence[str]) -> None:
        self._write(spec, [encode_delete(ids)] if ids else [], 0)

    def compact(self, spec: CollectionSpec, live: ItemBatch) -> None:
        self._write(spec, snapshot_segments(live), len(live), replace=True)

    def load(self, shard: ShardIndex) -> LoadReport:
        started, segments = time.perf_counter(), 0
        with self._lock:
            logs = {name: list(self._logs.get(name, [])) for name in self._meta}
            metas = dict(self._meta)
        for name in sorted(metas):
            fields = metas[name]
            segments += replay_log(
                shard, spec_from_meta(name, fields), logs[name], int(fields["rows"])
            )
        return _report(shard, segments, started)

    def segment_count(self, name: str) -> int:
        with self._lock:
            return len(self._logs.get(name, []))

    def close(self) -> None:
        pass

    def _write(
        self,
        spec: CollectionSpec,
        segments: list[bytes],
        rows: int,
        *,
        replace: bool = False,
    ) -> None:
        if self.fail_writes:
            raise Unavailable("in-memory store is set to fail")
        with self._lock:
            before = 0 if replace else int(self._meta.get(spec.name, {}).get("rows", 0))
            self._meta[spec.name] = meta_fields(spec, rows=before + rows)
            log_ = self._logs.setdefault(spec.name, [])
            if replace:
                log_.clear()
            log_.extend(segments)


RedisClient = redis.Redis | redis.cluster.RedisCluster
RedisClientTypes = (redis.Redis, redis.cluster.RedisCluster)


def connect(url: str, *, cluster: bool | None = None, **kwargs: Any) -> RedisClient:
    """A client for `url`: redis.Redis, or RedisCluster when the server is a cluster
    node (cluster=None asks the server; True/False skip the question). The same store
    code runs on both: every multi-key command stays inside one hash-tag slot."""
    options: dict[str, Any] = {
        "socket_timeout": 30,
        "socket_connect_timeout": 5,
        "health_check_interval": 30,
        **kwargs,
    }
    if cluster is None:
        probe = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
        try:
            info = probe.info("cluster")
            cluster = bool(info.get("cluster_enabled"))
        finally:
            probe.close()
    if cluster:
        options.pop("health_check_interval", None)
        return redis.cluster.RedisCluster.from_url(url, **options)
    return redis.Redis.from_url(url, **options)


class RedisShardStore:
    """ShardStore on Redis or Redis Cluster with sync redis-py (thread-safe pools)."""

    def __init__(
        self,
        client: RedisClient | Callable[[], RedisClient],
        shard_id: int,
        *,
        key_prefix: str = KEY_PREFIX,
        num_shards: int | None = None,
    ) -> None:
        """`client` may be a factory: it is called on first use, so a shard can start
        (and wait in ping()) while Redis is still down."""
        self._client: RedisClient | None = None
        self._factory: Callable[[], RedisClient] | None = None
        if callable(client) and not isinstance(client, RedisClientTypes):
            self._factory = client
        else:
            self._client = client  # type: ignore[assignment]
        self._shard_id, self._prefix = shard_id, key_prefix
        self._num_shards = num_shards
        self._registered: set[str] = set()
        self._connect_lock = threading.Lock()

    @classmethod
    def from_url(
        cls,
        url: str,
        shard_id: int,
        *,
        cluster: bool | None = None,
        key_prefix: str = KEY_PREFIX,
        num_shards: int | None = None,
    ) -> RedisShardStore:
        return cls(
            lambda: connect(url, cluster=cluster),
            shard_id,
            key_prefix=key_prefix,
            num_shards=num_shards,
        )

    @property
    def client(self) -> RedisClient:
        if self._client is None:
            with self._connect_lock:
                if self._client is None:
                    assert self._factory is not None
                    self._client = self._factory()
        return self._client

    @property
    def shard_id(self) -> int:
        return self._shard_id

    def meta_key(self, name: str) -> str:
        return meta_key(self._prefix, name, self._shard_id)

    def log_key(self, name: str) -> str:
        return log_key(self._prefix, name, self._shard_id)

    @property
    def collections_key(self) -> str:
        return collections_key(self._prefix, self._shard_id)

    def ping(self) -> None:
        self.client.ping()

    def durability(self) -> dict[str, str]:
        """appendonly / appendfsync as the server reports them (for the start log)."""
        try:
            got: Any = self.client.config_get("append*")
        except redis.RedisError as e:  # CONFIG may be disabled (managed Redis)
            return {"error": str(e)}
        if got and all(isinstance(v, dict) for v in got.values()):
            got = next(iter(got.values()))  # a cluster answers per node
        return {
            _text(k): _text(v)
            for k, v in got.items()
            if _text(k) in ("appendonly", "appendfsync")
        }

    def append_upsert(self, spec: CollectionSpec, batch: ItemBatch) -> None:
        self._write(spec, [encode_upsert(batch)] if len(batch) else [], len(batch))

    def append_delete(self, spec: CollectionSpec, ids: Sequence[str]) -> None:
        self._write(spec, [encode_delete(ids)] if ids else [], 0)

    def compact(self, spec: CollectionSpec, live: ItemBatch) -> None:
        self._write(spec, snapshot_segments(live), len(live), replace=True)

    def segment_count(self, name: str) -> int:
        return int(self.client.llen(self.log_key(name)))

    def collection_names(self) -> list[str]:
        return sorted(_text(n) for n in self.client.smembers(self.collections_key))

    def read_meta(self, name: str) -> dict[str, str]:
        raw = self.client.hgetall(self.meta_key(name))
        return {_text(k): _text(v) for k, v in raw.items()}

    def load(self, shard: ShardIndex) -> LoadReport:
        started, segments = time.perf_counter(), 0
        for name in self.collection_names():
            fields = self.read_meta(name)
            if not fields:
                # SADD happens before the first MULTI: a crash in between leaves a name
                # without data, which is harmless.
                log.warning("collection %r is listed but has no meta; skipped", name)
                continue
            if int(fields.get("format", "1")) > FORMAT_VERSION:
                raise ValueError(
                    f"collection {name!r} uses store format {fields['format']}, newer "
                    f"than this index reads ({FORMAT_VERSION})"
                )
            _check_shards(name, fields, self._num_shards)
            spec = spec_from_meta(name, fields)
            # rows: the upserted rows in the log, so the arrays are sized once
            # (absent in logs written before it was kept: then they grow)
            rows = int(fields.get("rows", 0))
            segments += replay_log(shard, spec, self.read_log(name), rows)
            self._registered.add(name)
        return _report(shard, segments, started)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def read_log(self, name: str, key: str | None = None) -> Iterator[bytes]:
        """LRANGE in chunks sized from the segments seen so far (~LOAD_CHUNK_BYTES
        per reply), so many small segments cost few round trips and big ones do
        not make huge replies."""
        return read_list(self.client, key or self.log_key(name))

    def _write(
        self,
        spec: CollectionSpec,
        segments: list[bytes],
        rows: int,
        *,
        replace: bool = False,
    ) -> None:
        """One MULTI/EXEC: meta, the count of upserted rows, the segments."""
        try:
            client = self.client
            if spec.name not in self._registered:
                # Outside the MULTI: in Redis Cluster this key lives in another slot.
                client.sadd(self.collections_key, spec.name)
                self._registered.add(spec.name)
            pipe = client.pipeline(transaction=True)
            fields = meta_fields(spec, self._num_shards)
            meta = self.meta_key(spec.name)
            pipe.hset(meta, mapping=fields)  # type: ignore[arg-type]
            if replace:
                pipe.hset(meta, "rows", rows)
                pipe.delete(self.log_key(spec.name))
            elif rows:
                pipe.hincrby(meta, "rows", rows)
            if segments:
                pipe.rpush(self.log_key(spec.name), *segments)
            pipe.execute()
        except redis.RedisError as e:
            raise Unavailable(
                f"redis write for collection {spec.name!r} failed: {e}"
            ) from e


def meta_key(prefix: str, name: str, shard: int) -> str:
    return f"{prefix}:{{{name}:{shard}}}:meta"


def log_key(prefix: str, name: str, shard: int) -> str:
    return f"{prefix}:{{{name}:{shard}}}:log"


def collections_key(prefix: str, shard: int) -> str:
    return f"{prefix}:collections:{shard}"


def read_list(client: RedisClient, key: str) -> Iterator[bytes]:
    start, count = 0, 16
    while True:
        chunk = client.lrange(key, start, start + count - 1)
        yield from (c if isinstance(c, bytes) else c.encode() for c in chunk)
        if len(chunk) < count:
            return
        start += len(chunk)
        average = max(1, sum(len(c) for c in chunk) // len(chunk))
        count = max(1, min(4096, LOAD_CHUNK_BYTES // average))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def wait_for_store(
    store: ShardStore, timeout_s: float, what: str = "redis"
) -> None:
    """Ping until the store answers, with exponential backoff; raise after timeout_s."""
    loop = asyncio.get_running_loop()
    deadline, delay, attempt = loop.time() + timeout_s, 0.1, 0
    while True:
        attempt += 1
        try:
            await asyncio.to_thread(store.ping)
            if attempt > 1:
                log.info("%s reachable after %d attempts", what, attempt)
            return
        except Exception as e:
            left = deadline - loop.time()
            if left <= 0:
                raise Unavailable(
                    f"{what} not reachable after {timeout_s:.0f}s "
                    f"({attempt} attempts): {e}"
                ) from e
            log.warning(
                "%s not reachable yet (attempt %d, retry in %.1fs): %s",
                what,
                attempt,
                delay,
                e,
            )
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, 5.0)
