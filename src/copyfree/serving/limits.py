"""Per-client admission: concurrent RPCs in flight and a token-bucket rate.

Over a limit the call is refused at once with RESOURCE_EXHAUSTED (never queued: a
queue would hide overload from the client and from the autoscaler). All state lives on
the server's event loop, so no locks are needed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from copyfree.errors import ResourceExhausted
from copyfree.serving.metrics import RPC_REJECTED

MAX_TRACKED_CLIENTS = 10_000  # idle buckets are dropped past this (peer-keyed clients)


@dataclass
class _Bucket:
    tokens: float
    updated: float
    in_flight: int = 0


@dataclass(frozen=True)
class Limits:
    """max_in_flight / rate_per_s of 0 = unlimited; burst 0 = max(1, rate)."""

    max_in_flight: int = 0
    rate_per_s: float = 0.0
    burst: int = 0

    @property
    def active(self) -> bool:
        return self.max_in_flight > 0 or self.rate_per_s > 0

    @property
    def capacity(self) -> float:
        return float(self.burst or max(1.0, self.rate_per_s))


class ClientLimiter:
    def __init__(self, default: Limits) -> None:
        self.default = default
        self._clients: dict[str, _Bucket] = {}

    def acquire(self, client: str, limits: Limits | None = None) -> None:
        """Admit one call of `client` or raise ResourceExhausted; pair with release."""
        lim = limits or self.default
        if not lim.active:
            return
        now = time.monotonic()
        bucket = self._clients.get(client)
        if bucket is None:
            if len(self._clients) >= MAX_TRACKED_CLIENTS:
                self._forget_idle()
            bucket = self._clients[client] = _Bucket(lim.capacity, now)
        if lim.max_in_flight and bucket.in_flight >= lim.max_in_flight:
            RPC_REJECTED.labels("in_flight").inc()
            raise ResourceExhausted(
                f"client {client!r} has {bucket.in_flight} calls in flight, "
                f"the limit is {lim.max_in_flight}"
            )
        if lim.rate_per_s:
            bucket.tokens = min(
                lim.capacity, bucket.tokens + (now - bucket.updated) * lim.rate_per_s
            )
            bucket.updated = now
            if bucket.tokens < 1.0:
                RPC_REJECTED.labels("rate").inc()
                raise ResourceExhausted(
                    f"client {client!r} is over its rate limit of "
                    f"{lim.rate_per_s:g} calls/s (burst {lim.capacity:g})"
                )
            bucket.tokens -= 1.0
        bucket.in_flight += 1

    def release(self, client: str, limits: Limits | None = None) -> None:
        lim = limits or self.default
        if not lim.active:
            return
        bucket = self._clients.get(client)
        if bucket is not None and bucket.in_flight > 0:
            bucket.in_flight -= 1

    def _forget_idle(self) -> None:
        for name in [n for n, b in self._clients.items() if b.in_flight == 0]:
            del self._clients[name]
