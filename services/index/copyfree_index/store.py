"""Durable record of one shard: append-only binary segments per collection in Redis.

Redis layout (API version in the key; one hash tag per (collection, shard) so Redis
Cluster can spread collections and shards while each one's keys share a slot):

    copyfree:v1:{<collection>:<shard>}:meta   HASH  format, kind, model_name,
                                                    model_version, code_bits, fine_dim
    copyfree:v1:{<collection>:<shard>}:log    LIST  binary segments, oldest first
    copyfree:v1:collections:<shard>           SET   collection names of the shard

One Upsert or Delete = one MULTI/EXEC (HSET meta + RPUSH one segment), done before the
RPC is acknowledged. A restart replays every segment in order (LRANGE in chunks, numpy
decoding). Compaction replaces the log by snapshot segments of the live rows in one
MULTI/EXEC (DEL + RPUSH), so a reader sees either the old log or the new one.

Segment format, version 1 (all integers little-endian):

    offset  size  field
    0       4     magic b"CFSG"
    4       1     format version = 1
    5       1     op: 1 = upsert (rows to insert or replace), 2 = delete (tombstones)
    6       1     vector element size in bytes: 2 = int16 (registry second keys),
                  1 = int8 (copyright-free fine codes), 0 = no vectors (delete)
    7       1     reserved, 0
    8       4     count: rows (upsert) or ids (delete)
    12      2     code_bytes: bytes per packed code (8 for first keys; 0 for delete)
    14      2     vector_dim: vector elements per row (0 for delete)
    16      4     json_len
    20            codes: count * code_bytes bytes, packed MSB-first as on the wire
                  vectors: count * vector_dim * element size bytes
                  json: UTF-8 {"ids": [...], "metadata": [[title, owner, licence,
                        source], ...]} with trailing empty strings dropped
                        (delete: {"ids": [...]})

Replay is idempotent per id (an upsert replaces, a delete of a dead id is a no-op), so
a segment written twice (a client retry after a lost reply) changes nothing.
A reader refuses segments of a newer format version instead of guessing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import redis

from copyfree.errors import Unavailable
from copyfree_index.shard import (
    CollectionKind,
    CollectionSpec,
    ItemBatch,
    Metadata,
    ModelRef,
    ShardIndex,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MAGIC = b"CFSG"
OP_UPSERT, OP_DELETE = 1, 2
KEY_PREFIX = "copyfree:v1"
SNAPSHOT_ROWS_PER_SEGMENT = 10_000  # like the largest Upsert: segments stay ~MBs
LOAD_CHUNK_BYTES = 32 * 1024 * 1024  # target size of one LRANGE reply at load
_HEADER = struct.Struct("<4sBBBBIHHI")
_KIND_NAMES = {
    CollectionKind.REGISTRY: "registry",
    CollectionKind.COPYRIGHT_FREE: "copyright_free",
}
_KINDS = {v: k for k, v in _KIND_NAMES.items()}


# ------------------------------------------------------------------------- segments


@dataclass(frozen=True)
class Deletion:
    ids: list[str]


Record = ItemBatch | Deletion


def encode_upsert(batch: ItemBatch) -> bytes:
    codes = np.ascontiguousarray(batch.codes, dtype=np.uint8)
    vectors = np.ascontiguousarray(batch.vectors)
    body = json.dumps(
        {"ids": batch.ids, "metadata": [m.to_list() for m in batch.metadata]},
        ensure_ascii=False,
        separators=(",", ":"),
    ).encode()
    header = _HEADER.pack(
        MAGIC,
        FORMAT_VERSION,
        OP_UPSERT,
        vectors.dtype.itemsize,
        0,
        len(batch),
        codes.shape[1],
        vectors.shape[1],
        len(body),
    )
    return b"".join(
        (
            header,
            codes.tobytes(),
            vectors.astype(vectors.dtype.newbyteorder("<"), copy=False).tobytes(),
            body,
        )
    )


def encode_delete(ids: Sequence[str]) -> bytes:
    body = json.dumps(
        {"ids": list(ids)}, ensure_ascii=False, separators=(",", ":")
    ).encode()
    header = _HEADER.pack(
        MAGIC, FORMAT_VERSION, OP_DELETE, 0, 0, len(ids), 0, 0, len(body)
    )
    return header + body


def decode_segment(data: bytes, spec: CollectionSpec) -> Record:
    """One segment -> ItemBatch or Deletion; checks it against the collection's spec."""
    if len(data) < _HEADER.size:
        raise ValueError(f"segment of {len(data)} bytes is shorter than its header")
    magic, version, op, itemsize, _, count, code_bytes, dim, json_len = (
        _HEADER.unpack_from(data)
    )
    if magic != MAGIC:
        raise ValueError(f"not a copyfree segment (magic {magic!r})")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"segment format version {version} is newer than this index reads "
            f"({FORMAT_VERSION}): upgrade the index before loading this data"
        )
    offset = _HEADER.size
    if op == OP_DELETE:
        ids = json.loads(data[offset : offset + json_len])["ids"]
        if len(ids) != count:
            raise ValueError(f"delete segment says {count} ids, holds {len(ids)}")
        return Deletion(ids)
    if op != OP_UPSERT:
        raise ValueError(f"unknown segment op {op}")
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
    return ItemBatch(
        ids,
        codes,
        vectors.astype(spec.vector_dtype, copy=False),
        [Metadata.from_list(m) for m in metas],
    )


def snapshot_segments(batch: ItemBatch) -> list[bytes]:
    """The live rows of a collection as upsert segments of bounded size."""
    step = SNAPSHOT_ROWS_PER_SEGMENT
    return [
        encode_upsert(
            ItemBatch(
                batch.ids[i : i + step],
                batch.codes[i : i + step],
                batch.vectors[i : i + step],
                batch.metadata[i : i + step],
            )
        )
        for i in range(0, len(batch), step)
    ]


def meta_fields(spec: CollectionSpec) -> dict[str, str]:
    return {
        "format": str(FORMAT_VERSION),
        "kind": _KIND_NAMES[spec.kind],
        "model_name": spec.model.name,
        "model_version": spec.model.version,
        "code_bits": str(spec.code_bits),
        "fine_dim": str(spec.vector_dim),
    }


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


def _replay(shard: ShardIndex, spec: CollectionSpec, segments: Iterable[bytes]) -> int:
    count = 0
    shard.upsert(spec, _empty_batch(spec))  # the collection exists even if emptied
    for data in segments:
        record = decode_segment(data, spec)
        if isinstance(record, Deletion):
            shard.delete(spec.name, record.ids)
        else:
            shard.upsert(spec, record)
        count += 1
    return count


def _empty_batch(spec: CollectionSpec) -> ItemBatch:
    return ItemBatch(
        [],
        np.zeros((0, spec.code_bytes), np.uint8),
        np.zeros((0, spec.vector_dim), spec.vector_dtype),
        [],
    )


def _report(shard: ShardIndex, segments: int, started: float) -> LoadReport:
    stats = shard.stats()
    return LoadReport(
        len(stats),
        segments,
        sum(s.items for s in stats),
        sum(s.tombstones for s in stats),
        time.perf_counter() - started,
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
        self._write(spec, [encode_upsert(batch)] if len(batch) else [])

    def append_delete(self, spec: CollectionSpec, ids: Sequence[str]) -> None:
        self._write(spec, [encode_delete(ids)] if ids else [])

    def compact(self, spec: CollectionSpec, live: ItemBatch) -> None:
        self._write(spec, snapshot_segments(live), replace=True)

    def load(self, shard: ShardIndex) -> LoadReport:
        started, segments = time.perf_counter(), 0
        with self._lock:
            logs = {name: list(self._logs.get(name, [])) for name in self._meta}
            metas = dict(self._meta)
        for name in sorted(metas):
            segments += _replay(shard, spec_from_meta(name, metas[name]), logs[name])
        return _report(shard, segments, started)

    def segment_count(self, name: str) -> int:
        with self._lock:
            return len(self._logs.get(name, []))

    def close(self) -> None:
        pass

    def _write(
        self, spec: CollectionSpec, segments: list[bytes], *, replace: bool = False
    ) -> None:
        if self.fail_writes:
            raise Unavailable("in-memory store is set to fail")
        with self._lock:
            self._meta[spec.name] = meta_fields(spec)
            log_ = self._logs.setdefault(spec.name, [])
            if replace:
                log_.clear()
            log_.extend(segments)


class RedisShardStore:
    """ShardStore on Redis with sync redis-py (thread-safe connection pool)."""

    def __init__(
        self, client: redis.Redis, shard_id: int, *, key_prefix: str = KEY_PREFIX
    ) -> None:
        self._client, self._shard_id, self._prefix = client, shard_id, key_prefix
        self._registered: set[str] = set()

    @classmethod
    def from_url(cls, url: str, shard_id: int, **kwargs: Any) -> RedisShardStore:
        client = redis.Redis.from_url(
            url, socket_timeout=30, socket_connect_timeout=5, health_check_interval=30
        )
        return cls(client, shard_id, **kwargs)

    def meta_key(self, name: str) -> str:
        return f"{self._prefix}:{{{name}:{self._shard_id}}}:meta"

    def log_key(self, name: str) -> str:
        return f"{self._prefix}:{{{name}:{self._shard_id}}}:log"

    @property
    def collections_key(self) -> str:
        return f"{self._prefix}:collections:{self._shard_id}"

    def ping(self) -> None:
        self._client.ping()

    def append_upsert(self, spec: CollectionSpec, batch: ItemBatch) -> None:
        self._write(spec, [encode_upsert(batch)] if len(batch) else [])

    def append_delete(self, spec: CollectionSpec, ids: Sequence[str]) -> None:
        self._write(spec, [encode_delete(ids)] if ids else [])

    def compact(self, spec: CollectionSpec, live: ItemBatch) -> None:
        self._write(spec, snapshot_segments(live), replace=True)

    def segment_count(self, name: str) -> int:
        return int(self._client.llen(self.log_key(name)))

    def load(self, shard: ShardIndex) -> LoadReport:
        started, segments = time.perf_counter(), 0
        names = sorted(_text(n) for n in self._client.smembers(self.collections_key))
        for name in names:
            raw = self._client.hgetall(self.meta_key(name))
            if not raw:
                # SADD happens before the first MULTI: a crash in between leaves a name
                # without data, which is harmless.
                log.warning("collection %r is listed but has no meta; skipped", name)
                continue
            fields = {_text(k): _text(v) for k, v in raw.items()}
            if int(fields.get("format", "1")) > FORMAT_VERSION:
                raise ValueError(
                    f"collection {name!r} uses store format {fields['format']}, newer "
                    f"than this index reads ({FORMAT_VERSION})"
                )
            spec = spec_from_meta(name, fields)
            segments += _replay(shard, spec, self._read_log(name))
            self._registered.add(name)
        return _report(shard, segments, started)

    def close(self) -> None:
        self._client.close()

    def _read_log(self, name: str) -> Iterator[bytes]:
        """LRANGE in chunks sized from the segments seen so far (~LOAD_CHUNK_BYTES
        per reply), so many small segments cost few round trips and big ones do
        not make huge replies."""
        key, start, count = self.log_key(name), 0, 16
        while True:
            chunk = self._client.lrange(key, start, start + count - 1)
            yield from (c if isinstance(c, bytes) else c.encode() for c in chunk)
            if len(chunk) < count:
                return
            start += len(chunk)
            average = max(1, sum(len(c) for c in chunk) // len(chunk))
            count = max(1, min(4096, LOAD_CHUNK_BYTES // average))

    def _write(
        self, spec: CollectionSpec, segments: list[bytes], *, replace: bool = False
    ) -> None:
        try:
            if spec.name not in self._registered:
                # Outside the MULTI: in Redis Cluster this key lives in another slot.
                self._client.sadd(self.collections_key, spec.name)
                self._registered.add(spec.name)
            pipe = self._client.pipeline(transaction=True)
            pipe.hset(self.meta_key(spec.name), mapping=meta_fields(spec))  # type: ignore[arg-type]
            if replace:
                pipe.delete(self.log_key(spec.name))
            if segments:
                pipe.rpush(self.log_key(spec.name), *segments)
            pipe.execute()
        except redis.RedisError as e:
            raise Unavailable(
                f"redis write for collection {spec.name!r} failed: {e}"
            ) from e


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
