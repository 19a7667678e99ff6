"""Bearer tokens with scopes: who may call which RPC.

Tokens come from a JSON object (a file mounted from a Secret, or an env variable):

    {"<token>": {"client": "teacher-portal", "scopes": ["check"],
                 "max_in_flight": 8, "rate_per_s": 20}}

Scopes: `check` (read: Check, Recommend, Encode, Detect, Similar, ModelInfo),
`register` (write: Register, Delete, Upsert), `admin` (Stats, ListAudit). A scope does
not imply another. Health and reflection never need a token (probes, ghz, grpcurl).
Tokens are kept only as SHA-256 digests, so a lookup compares digests, not secrets.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from copyfree.errors import CopyfreeError

SCOPES = frozenset({"check", "register", "admin"})
AUTH_HEADER = "authorization"
OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")

# Full method -> scope it needs. A method of ours missing here needs "admin" (fail
# closed: a new RPC is admin-only until someone decides otherwise).
METHOD_SCOPES: dict[str, str] = {
    "/copyfree.v1.GatewayService/Check": "check",
    "/copyfree.v1.GatewayService/Recommend": "check",
    "/copyfree.v1.GatewayService/ModelInfo": "check",
    "/copyfree.v1.GatewayService/Register": "register",
    "/copyfree.v1.GatewayService/Delete": "register",
    "/copyfree.v1.GatewayService/Stats": "admin",
    "/copyfree.v1.GatewayService/ListAudit": "admin",
    "/copyfree.v1.EncoderService/Encode": "check",
    "/copyfree.v1.EncoderService/EncodeBatch": "check",
    "/copyfree.v1.EncoderService/ModelInfo": "check",
    "/copyfree.v1.IndexService/Detect": "check",
    "/copyfree.v1.IndexService/Similar": "check",
    "/copyfree.v1.IndexService/Upsert": "register",
    "/copyfree.v1.IndexService/Delete": "register",
    "/copyfree.v1.IndexService/Stats": "admin",
}


class Unauthenticated(CopyfreeError):
    status = "UNAUTHENTICATED"


class PermissionDenied(CopyfreeError):
    status = "PERMISSION_DENIED"


@dataclass(frozen=True)
class Principal:
    """An authenticated caller and what it may do (limits: None = service default)."""

    client: str
    scopes: frozenset[str]
    max_in_flight: int | None = None
    rate_per_s: float | None = None


# The caller of the RPC being served ("" when auth is off), for audit and logs.
current_client: contextvars.ContextVar[str] = contextvars.ContextVar(
    "current_client", default=""
)


def required_scope(method: str) -> str | None:
    """The scope a full method name needs; None for the always-open services."""
    if method.startswith(OPEN_PREFIXES):
        return None
    return METHOD_SCOPES.get(method, "admin")


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenTable:
    """Token digests -> principals. Build with `from_json` / `from_sources`."""

    def __init__(self, principals: Mapping[str, Principal]) -> None:
        self._by_digest = {_digest(t): p for t, p in principals.items()}

    def __len__(self) -> int:
        return len(self._by_digest)

    @classmethod
    def from_json(cls, text: str, *, source: str = "tokens") -> TokenTable:
        """Parse and validate the token JSON; ValueError names the bad entry."""
        return cls(_parse(text, source))

    @classmethod
    def from_sources(cls, file: Path | None, inline: str | None) -> TokenTable | None:
        """Tokens from a file and/or inline JSON (both: merged); None = auth off."""
        if file is None and inline is None:
            return None
        merged: dict[str, Principal] = {}
        if file is not None:
            merged.update(_parse(file.read_text(), str(file)))
        if inline is not None:
            merged.update(_parse(inline, "inline tokens"))
        return cls(merged)

    def authenticate(self, metadata: Any) -> Principal:
        """Principal for the call's `authorization: Bearer <token>`; raises
        Unauthenticated when it is missing, malformed or unknown."""
        value = None
        for key, v in metadata or ():
            if key == AUTH_HEADER:
                value = v if isinstance(v, str) else v.decode(errors="replace")
                break
        if value is None:
            raise Unauthenticated("missing 'authorization: Bearer <token>' metadata")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("authorization metadata must be 'Bearer <token>'")
        principal = self._by_digest.get(_digest(token.strip()))
        if principal is None:
            raise Unauthenticated("unknown bearer token")
        return principal


def authorize(principal: Principal, method: str) -> None:
    """Raises PermissionDenied unless the principal holds the method's scope."""
    scope = required_scope(method)
    if scope is not None and scope not in principal.scopes:
        raise PermissionDenied(
            f"client {principal.client!r} lacks scope {scope!r} for {method}"
        )


def _parse(text: str, source: str) -> dict[str, Principal]:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: not JSON: {e}") from None
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{source}: must be a non-empty JSON object token -> grant")
    return {t: _principal(t, g, source) for t, g in raw.items()}


def _principal(token: str, grant: Any, source: str) -> Principal:
    where = f"{source}: token ...{token[-4:]}" if len(token) >= 8 else source
    if len(token) < 16:
        raise ValueError(f"{where}: tokens must be at least 16 characters")
    if not isinstance(grant, dict):
        raise ValueError(f"{where}: grant must be an object with client and scopes")
    client, scopes = grant.get("client"), grant.get("scopes")
    if not isinstance(client, str) or not client:
        raise ValueError(f"{where}: 'client' must be a non-empty string")
    if not isinstance(scopes, list) or not set(scopes) <= SCOPES or not scopes:
        raise ValueError(
            f"{where}: 'scopes' must be a non-empty list of {sorted(SCOPES)}, "
            f"got {scopes!r}"
        )
    max_in_flight, rate = grant.get("max_in_flight"), grant.get("rate_per_s")
    if max_in_flight is not None and (
        not isinstance(max_in_flight, int) or max_in_flight < 0
    ):
        raise ValueError(f"{where}: 'max_in_flight' must be an integer >= 0")
    if rate is not None and (not isinstance(rate, int | float) or rate < 0):
        raise ValueError(f"{where}: 'rate_per_s' must be a number >= 0")
    return Principal(
        client,
        frozenset(scopes),
        max_in_flight,
        float(rate) if rate is not None else None,
    )
