"""Token table parsing, authentication and scope rules (pure, no server)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from copyfree.serving.auth import (
    PermissionDenied,
    Principal,
    TokenTable,
    Unauthenticated,
    authorize,
    required_scope,
)

TOKEN = "a-long-enough-token-0001"
GRANTS = {TOKEN: {"client": "teacher-portal", "scopes": ["check"]}}


def test_authenticate_returns_the_principal_of_a_known_bearer_token() -> None:
    table = TokenTable.from_json(json.dumps(GRANTS))
    principal = table.authenticate([("authorization", f"Bearer {TOKEN}")])
    assert principal == Principal("teacher-portal", frozenset({"check"}))
    assert table.authenticate([("authorization", f"bearer  {TOKEN} ")]) == principal


@pytest.mark.parametrize(
    "metadata",
    [
        [],
        [("x-request-id", "r1")],
        [("authorization", TOKEN)],
        [("authorization", f"Basic {TOKEN}")],
        [("authorization", "Bearer another-token-of-length")],
    ],
)
def test_missing_malformed_or_unknown_tokens_are_unauthenticated(
    metadata: list[tuple[str, str]],
) -> None:
    with pytest.raises(Unauthenticated) as err:
        TokenTable.from_json(json.dumps(GRANTS)).authenticate(metadata)
    assert err.value.status == "UNAUTHENTICATED"


def test_scopes_are_checked_per_method_and_do_not_imply_each_other() -> None:
    checker = Principal("c", frozenset({"check"}))
    admin = Principal("a", frozenset({"admin"}))
    authorize(checker, "/copyfree.v1.GatewayService/Check")
    authorize(admin, "/copyfree.v1.GatewayService/ListAudit")
    for principal, method in (
        (checker, "/copyfree.v1.GatewayService/Register"),
        (checker, "/copyfree.v1.IndexService/Upsert"),
        (admin, "/copyfree.v1.GatewayService/Check"),
    ):
        with pytest.raises(PermissionDenied) as err:
            authorize(principal, method)
        assert err.value.status == "PERMISSION_DENIED"


def test_health_and_reflection_are_open_and_unknown_methods_need_admin() -> None:
    assert required_scope("/grpc.health.v1.Health/Check") is None
    assert required_scope("/grpc.reflection.v1alpha.ServerReflection/X") is None
    assert required_scope("/copyfree.v1.GatewayService/SomethingNew") == "admin"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "not JSON"),
        ("{}", "non-empty"),
        ('{"short": {"client": "c", "scopes": ["check"]}}', "16 characters"),
        (json.dumps({TOKEN: {"scopes": ["check"]}}), "'client'"),
        (json.dumps({TOKEN: {"client": "c", "scopes": ["root"]}}), "'scopes'"),
        (
            json.dumps({TOKEN: {"client": "c", "scopes": ["check"], "rate_per_s": -1}}),
            "rate_per_s",
        ),
    ],
)
def test_bad_token_files_fail_at_start_naming_the_problem(
    text: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        TokenTable.from_json(text)


def test_file_and_inline_tokens_merge_and_neither_means_auth_off(
    tmp_path: Path,
) -> None:
    other = "another-long-token-0002"
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps(GRANTS))
    inline = json.dumps({other: {"client": "ops", "scopes": ["admin"]}})
    table = TokenTable.from_sources(path, inline)
    assert table is not None and len(table) == 2
    assert table.authenticate([("authorization", f"Bearer {other}")]).client == "ops"
    assert TokenTable.from_sources(None, None) is None
