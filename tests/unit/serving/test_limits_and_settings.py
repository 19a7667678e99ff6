"""Per-client limiter, security settings validation and outbound deadlines."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from copyfree import errors
from copyfree.serving.interceptors import call_deadline
from copyfree.serving.limits import ClientLimiter, Limits
from copyfree.serving.settings import ServiceSettings
from copyfree_gateway.clients import Upstream
from copyfree_gateway.settings import GatewaySettings


def test_in_flight_limit_is_per_client_and_released_slots_are_reusable() -> None:
    limiter = ClientLimiter(Limits(max_in_flight=2))
    limiter.acquire("a")
    limiter.acquire("a")
    with pytest.raises(errors.ResourceExhausted, match="2 calls in flight"):
        limiter.acquire("a")
    limiter.acquire("b")  # another client has its own slots
    limiter.release("a")
    limiter.acquire("a")


def test_rate_limit_allows_the_burst_then_refuses() -> None:
    # 0.001/s refills one call in ~17 minutes: no timing in this test.
    limiter = ClientLimiter(Limits(rate_per_s=0.001, burst=3))
    for _ in range(3):
        limiter.acquire("a")
        limiter.release("a")
    with pytest.raises(errors.ResourceExhausted, match="rate limit"):
        limiter.acquire("a")


def test_per_client_limits_override_the_default() -> None:
    limiter = ClientLimiter(Limits())  # unlimited by default
    for _ in range(50):
        limiter.acquire("anyone")
    special = Limits(max_in_flight=1)
    limiter.acquire("special", special)
    with pytest.raises(errors.ResourceExhausted):
        limiter.acquire("special", special)


def test_tls_settings_come_in_pairs(tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    assert ServiceSettings(tls_cert_file=cert, tls_key_file=key).tls_enabled
    assert not ServiceSettings().tls_enabled and not ServiceSettings().auth_enabled
    with pytest.raises(ValidationError, match="both"):
        ServiceSettings(tls_cert_file=cert)
    with pytest.raises(ValidationError, match="mutual"):
        ServiceSettings(tls_client_ca_file=cert)
    with pytest.raises(ValidationError, match="upstream_ca_file"):
        GatewaySettings(upstream_cert_file=cert, upstream_key_file=key)


def test_gateway_token_from_file_or_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "token"
    path.write_text("file-token-0123456789\n")
    assert GatewaySettings(upstream_token_file=path).upstream_bearer() == (
        "file-token-0123456789"
    )
    monkeypatch.setenv("GATEWAY_UPSTREAM_TOKEN", "env-token-0123456789")
    settings = GatewaySettings()
    assert settings.upstream_bearer() == "env-token-0123456789"
    assert "env-token" not in repr(settings)  # a secret, never logged


def test_outbound_timeout_is_capped_by_the_callers_deadline() -> None:
    upstream = Upstream(timeout_s=30.0, max_message_bytes=1024)
    assert upstream.timeout() == 30.0  # no incoming deadline
    token = call_deadline.set(time.monotonic() + 3600)
    try:
        assert upstream.timeout() == 30.0
    finally:
        call_deadline.reset(token)
    token = call_deadline.set(time.monotonic() + 5)
    try:
        assert 0 < upstream.timeout() <= 5
    finally:
        call_deadline.reset(token)
    token = call_deadline.set(time.monotonic() - 1)
    try:
        with pytest.raises(errors.DeadlineExceeded):
            upstream.timeout()
    finally:
        call_deadline.reset(token)


def test_upstream_metadata_carries_request_id_and_the_gateways_token() -> None:
    from copyfree.serving.logging import request_id

    token = request_id.set("rid-7")
    try:
        md = dict(Upstream(1.0, 1024, token="gw-token-0123456789").metadata())
    finally:
        request_id.reset(token)
    assert md == {
        "x-request-id": "rid-7",
        "authorization": "Bearer gw-token-0123456789",
    }
