"""The `copyfree` command line against the secured gateway: TLS verified against the
operator's CA, the bearer token read from a file or $COPYFREE_TOKEN, never a flag."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from copyfree_cli.__main__ import main
from tests.integration.auth.conftest import ADMIN, CHECKER, SecureStack

pytestmark = [pytest.mark.redis, pytest.mark.asyncio(loop_scope="module")]


def _tls(stack: SecureStack) -> list[str]:
    return ["--gateway", stack.gateway_addr, "--ca-file", str(stack.certs.ca)]


async def test_check_with_token_file_over_tls_names_the_registered_work(
    stack: SecureStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "reg-2.png"
    image.write_bytes(stack.images["reg-2"])
    token = tmp_path / "token"
    token.write_text(CHECKER + "\n")
    argv = ["check", str(image), "--json", "--token-file", str(token), *_tls(stack)]
    # The command blocks; the servers live on this event loop, so run it in a thread.
    assert await asyncio.to_thread(main, argv) == 0
    reply = json.loads(capsys.readouterr().out)
    assert reply["verdict"] == "VERDICT_REGISTERED"
    assert reply["match"]["id"] == "reg-2"


async def test_stats_takes_the_token_from_the_environment(
    stack: SecureStack,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("COPYFREE_TOKEN", ADMIN)
    assert await asyncio.to_thread(main, ["stats", *_tls(stack)]) == 0
    assert json.loads(capsys.readouterr().out)["shards"][0]["ready"] is True


async def test_without_a_token_the_cli_says_unauthenticated_and_exits_1(
    stack: SecureStack,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("COPYFREE_TOKEN", raising=False)
    image = tmp_path / "x.png"
    image.write_bytes(stack.images["unregistered"])
    assert await asyncio.to_thread(main, ["check", str(image), *_tls(stack)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("copyfree check: UNAUTHENTICATED: "), err
    assert "Traceback" not in err
