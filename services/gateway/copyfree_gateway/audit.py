"""Audit log of every Check: who asked, what was answered, on which evidence.

One entry per Check that passed authentication (answered or failed): time, caller,
request id, status, verdict, matched id with its distances, the detection evidence,
model versions and the image's SHA-256 (never the image). Entries go to a Redis stream
(`XADD ... MAXLEN ~ N`), whose ids are millisecond timestamps, so a time range is a
range of ids; `ListAudit` (scope admin) reads it newest first.

The record is written before the answer leaves: with `audit_fail_open` false (the
default) a Check whose record cannot be written fails with UNAVAILABLE, so nothing is
answered off the record. Audit is off when GATEWAY_REDIS_URL is empty.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import TYPE_CHECKING, Any, Protocol

from copyfree import errors
from copyfree.serving import ServicerContext
from copyfree.serving.auth import current_client
from copyfree.serving.logging import request_id
from copyfree.serving.metrics import AUDIT_WRITES
from copyfree.v1 import gateway_pb2
from copyfree_gateway.servicer import GatewayServicer

if TYPE_CHECKING:  # redis is imported only when audit is on (gateway boundary test)
    import redis.asyncio

log = logging.getLogger(__name__)

MAX_LIST = 1000
DEFAULT_LIST = 100
_FIELD = b"pb"  # the stream entry's one field: the serialized AuditEntry


class AuditLog(Protocol):
    async def append(self, entry: gateway_pb2.AuditEntry) -> str: ...

    async def read(
        self, request: gateway_pb2.ListAuditRequest
    ) -> gateway_pb2.ListAuditResponse: ...

    async def close(self) -> None: ...


class RedisAuditLog:
    """AuditLog on a Redis stream (one key; fine for Redis Cluster, it is one slot)."""

    def __init__(self, client: redis.asyncio.Redis, key: str, max_entries: int) -> None:
        self._client, self._key, self._max_entries = client, key, max_entries

    @classmethod
    def from_url(cls, url: str, key: str, max_entries: int) -> RedisAuditLog:
        try:
            import redis.asyncio
        except ImportError:  # the gateway image must carry redis when audit is on
            raise RuntimeError(
                "GATEWAY_REDIS_URL is set but the redis package is not installed"
            ) from None

        client = redis.asyncio.Redis.from_url(
            url, socket_timeout=5, socket_connect_timeout=5, health_check_interval=30
        )
        return cls(client, key, max_entries)

    async def ping(self) -> None:
        await self._client.ping()

    async def append(self, entry: gateway_pb2.AuditEntry) -> str:
        entry_id = await self._client.xadd(
            self._key,
            {_FIELD: entry.SerializeToString()},
            maxlen=self._max_entries,
            approximate=True,
        )
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    async def read(
        self, request: gateway_pb2.ListAuditRequest
    ) -> gateway_pb2.ListAuditResponse:
        limit = request.limit or DEFAULT_LIST
        if not 1 <= limit <= MAX_LIST:
            raise errors.InvalidInput(
                f"limit must be in [1, {MAX_LIST}], got {request.limit}"
            )
        if request.since_unix_ms < 0:
            raise errors.InvalidInput(
                f"since_unix_ms must be >= 0, got {request.since_unix_ms}"
            )
        high = f"({request.before}" if request.before else "+"  # "(" = exclusive
        low = str(request.since_unix_ms) if request.since_unix_ms else "-"
        reply = gateway_pb2.ListAuditResponse()
        while True:
            # With a caller filter, read whole pages: most rows may be someone else's.
            count = DEFAULT_LIST if request.caller else limit - len(reply.entries)
            page = await self._read(high, low, count)
            for entry_id, entry in page:
                high = f"({entry_id}"
                if request.caller and entry.caller != request.caller:
                    continue
                reply.entries.append(entry)
                if len(reply.entries) == limit:
                    reply.next_cursor = entry_id
                    return reply
            if len(page) < count:  # the range is exhausted
                return reply

    async def _read(
        self, high: str, low: str, count: int
    ) -> list[tuple[str, gateway_pb2.AuditEntry]]:
        try:
            rows = await self._client.xrevrange(self._key, high, low, count=count)
        except Exception as e:  # redis errors, connection errors
            if "Invalid stream ID" in str(e):
                raise errors.InvalidInput(f"before is not a cursor: {e}") from None
            raise errors.Unavailable(f"audit log unreachable: {e}") from None
        out = []
        for raw_id, fields in rows or ():
            entry_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            data = (fields or {}).get(_FIELD, b"")
            entry = gateway_pb2.AuditEntry.FromString(
                data if isinstance(data, bytes) else data.encode()
            )
            entry.id = entry_id
            out.append((entry_id, entry))
        return out

    async def close(self) -> None:
        await self._client.aclose()


def check_entry(
    request: gateway_pb2.CheckRequest,
    reply: gateway_pb2.CheckResponse | None,
    status: str,
    registry: str,
    started: float,
) -> gateway_pb2.AuditEntry:
    """The record of one Check (reply None when it failed with `status`)."""
    entry = gateway_pb2.AuditEntry(
        time_unix_ms=int(time.time() * 1000),
        request_id=request_id.get(),
        caller=current_client.get(),
        status=status,
        collection=registry,
        image_sha256=hashlib.sha256(request.image).hexdigest(),
        image_bytes=len(request.image),
        duration_ms=(time.perf_counter() - started) * 1000,
    )
    if reply is not None:
        entry.verdict = reply.verdict
        entry.evidence.CopyFrom(reply.evidence)
        entry.detection_model.CopyFrom(reply.evidence.model)
        if reply.HasField("match"):
            entry.collection = reply.match.collection
            entry.matched_id = reply.match.id
            entry.hamming = reply.match.hamming
            entry.cosine = reply.match.cosine
        if reply.HasField("retrieval_model"):
            entry.retrieval_model.CopyFrom(reply.retrieval_model)
        entry.recommended_ids.extend(r.id for r in reply.recommendations)
    return entry


class AuditedGatewayServicer(GatewayServicer):
    """GatewayServicer plus the audit record of every Check and the ListAudit RPC.

    Wraps Check rather than editing it: the decision code stays free of storage
    concerns, and audit=None (audit off) costs nothing."""

    def __init__(
        self, *args: Any, audit: AuditLog | None = None, fail_open: bool = False
    ) -> None:
        super().__init__(*args)
        self._audit, self._fail_open = audit, fail_open

    async def Check(
        self, request: gateway_pb2.CheckRequest, context: ServicerContext
    ) -> gateway_pb2.CheckResponse:
        if self._audit is None:
            return await super().Check(request, context)
        started = time.perf_counter()
        registry = request.registry or self._settings.registry_collection
        try:
            reply = await super().Check(request, context)
        except Exception as e:  # on record as the status the caller will get
            status = e.status if isinstance(e, errors.CopyfreeError) else "INTERNAL"
            await self._record(check_entry(request, None, status, registry, started))
            raise
        await self._record(check_entry(request, reply, "OK", registry, started))
        return reply

    async def _record(self, entry: gateway_pb2.AuditEntry) -> None:
        assert self._audit is not None
        try:
            await self._audit.append(entry)
        except Exception as e:
            AUDIT_WRITES.labels("failed").inc()
            log.error("audit record of request %s not written: %s", entry.request_id, e)
            if not self._fail_open:
                raise errors.Unavailable(
                    "the audit log is unreachable; Check is refused until it is back"
                ) from None
            return
        AUDIT_WRITES.labels("written").inc()

    async def ListAudit(
        self, request: gateway_pb2.ListAuditRequest, context: ServicerContext
    ) -> gateway_pb2.ListAuditResponse:
        if self._audit is None:
            raise errors.FailedPrecondition(
                "the audit log is off on this gateway (set GATEWAY_REDIS_URL)"
            )
        return await self._audit.read(request)

    async def close(self) -> None:
        if self._audit is not None:
            await self._audit.close()
