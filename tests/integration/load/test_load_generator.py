"""The load generator (and the h2load recipe) against a running stack: encoder, two
index shards and the gateway as real processes (tiny bundles), auth and audit on.
Bounded: loopback only, a couple of seconds or a fixed count per run."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import grpc
import pytest

from copyfree.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from copyfree_cli.load import RunSpec, Target, run
from copyfree_cli.load import main as load_main
from copyfree_cli.stack import LocalStack, StackConfig
from copyfree_index.embedded_redis import RedisProcess
from tests.utils.images import make_image_bytes
from tests.utils.tiny_bundles import make_detection_bundle, make_retrieval_bundle

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

ROOT = Path(__file__).resolve().parents[3]
LOAD = "load-token-0123456789"
ADMIN = "admin-token-0123456789"
REGISTRAR = "registrar-token-0123456789"
INTERNAL = "internal-gateway-token-0123"
CLIENTS = {
    LOAD: {"client": "loadtest", "scopes": ["check"]},
    ADMIN: {"client": "ops", "scopes": ["admin"]},
    REGISTRAR: {"client": "ingest", "scopes": ["register"]},
}
REGISTERED, FREE = 12, 12


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for s in range(REGISTERED + FREE):
        (folder / f"img-{s:03d}.png").write_bytes(make_image_bytes(s))
    return folder


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisProcess, images: Path
) -> Iterator[LocalStack]:
    root = tmp_path_factory.mktemp("stack")
    internal = json.dumps(
        {INTERNAL: {"client": "gateway", "scopes": ["check", "register", "admin"]}}
    )
    config = StackConfig(
        detection_bundle=make_detection_bundle(root / "detection"),
        retrieval_bundle=make_retrieval_bundle(root / "retrieval", bits=16),
        shards=2,
        data_dir=root / "state",
        redis_url=redis_server.url,
        ready_timeout_s=120,
        extra_env={
            "ENCODER_AUTH_TOKENS": internal,
            "INDEX_AUTH_TOKENS": internal,
            "GATEWAY_AUTH_TOKENS": json.dumps(CLIENTS),
            "GATEWAY_UPSTREAM_TOKEN": INTERNAL,
            "GATEWAY_REDIS_URL": redis_server.url,
        },
    )
    with LocalStack.on_free_ports(config) as stack:
        with grpc.insecure_channel(stack.gateway_addr) as ch:
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)
            files = sorted(images.iterdir())
            for collection, kind, chunk in (
                ("registry", common_pb2.COLLECTION_KIND_REGISTRY, files[:REGISTERED]),
                (
                    "copyright-free",
                    common_pb2.COLLECTION_KIND_COPYRIGHT_FREE,
                    files[REGISTERED:],
                ),
            ):
                reply = stub.Register(
                    iter(
                        gateway_pb2.RegisterRequest(
                            collection=collection, kind=kind, id=f.stem,
                            image=f.read_bytes(),
                        )
                        for f in chunk
                    ),
                    timeout=60,
                    metadata=(("authorization", f"Bearer {REGISTRAR}"),),
                )  # fmt: skip
                assert reply.registered == len(chunk) and not reply.failures
        yield stack


def _target(stack: LocalStack, token: str | None = LOAD) -> Target:
    return Target(
        gateway=stack.gateway_addr,
        encoder=stack.encoder_addr,
        index=tuple(stack.index_addrs()),
        token=token,
    )


def _payloads(images: Path) -> list[bytes]:
    files = sorted(images.iterdir())
    # Registered images and never-registered ones: both Check paths.
    return [f.read_bytes() for f in files[:4]] + [
        make_image_bytes(s) for s in (7001, 7002)
    ]


async def test_check_under_load_for_two_seconds_has_zero_errors(
    stack: LocalStack, images: Path
) -> None:
    spec = RunSpec("check", concurrency=4, duration_s=2.0, warmup_s=0.3)
    report = await run(_target(stack), spec, _payloads(images))
    assert report.count > 0
    assert report.status_codes == {"OK": report.count}, report.summary()
    assert len(report.latencies_s) == report.count and report.rps > 0
    doc = report.ghz_json()
    assert doc["count"] == report.count and doc["statusCodeDistribution"]["OK"]


@pytest.mark.parametrize("call", ["direct-check", "encode", "detect", "similar"])
async def test_encoder_and_index_called_directly_have_zero_errors(
    stack: LocalStack, images: Path, call: str
) -> None:
    """What the gateway's overhead is measured against: the same work, no gateway.
    Encoder and index accept only the gateway's token."""
    target = _target(stack, INTERNAL)
    spec = RunSpec(call, concurrency=2, total=24, warmup_s=0)
    report = await run(target, spec, _payloads(images))
    assert report.status_codes == {"OK": 24}, report.summary()


async def test_without_a_token_every_call_is_counted_as_unauthenticated(
    stack: LocalStack, images: Path
) -> None:
    spec = RunSpec("check", concurrency=2, total=10, warmup_s=0)
    report = await run(_target(stack, None), spec, _payloads(images))
    assert report.status_codes == {"UNAUTHENTICATED": 10}
    assert report.error_count == 10 and report.errors


def test_cli_writes_the_ghz_json_report_and_the_audit_log_saw_the_checks(
    stack: LocalStack, images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "report.json"
    with grpc.insecure_channel(stack.gateway_addr) as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        admin = (("authorization", f"Bearer {ADMIN}"),)
        before = stub.ListAudit(
            gateway_pb2.ListAuditRequest(limit=1000), timeout=10, metadata=admin
        )
        rc = load_main(
            ["--call", "check", "-c", "2", "-n", "16", "--warmup", "0",
             "--gateway", stack.gateway_addr, "--token", LOAD,
             "--images", str(images), "--payloads", "4", "--json", str(out)]
        )  # fmt: skip
        after = stub.ListAudit(
            gateway_pb2.ListAuditRequest(limit=1000, caller="loadtest"),
            timeout=10,
            metadata=admin,
        )
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["count"] == 16 and doc["statusCodeDistribution"] == {"OK": 16}
    assert {d["percentage"] for d in doc["latencyDistribution"]} >= {50, 90, 99}
    new = [e for e in after.entries if e.id not in {b.id for b in before.entries}]
    assert len(new) == 16
    assert all(e.verdict == gateway_pb2.VERDICT_REGISTERED for e in new)


def _load_script(name: str) -> ModuleType:
    path = ROOT / "deploy" / "loadtest" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"loadtest_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_h2load_recipe_gets_every_answer_byte_for_byte(
    stack: LocalStack, images: Path
) -> None:
    h2load = shutil.which("h2load")
    if h2load is None:
        pytest.skip("h2load not installed (apt-get install nghttp2-client)")
    recipe = _load_script("h2load_check")
    request = gateway_pb2.CheckRequest(
        image=sorted(images.iterdir())[0].read_bytes(), top_n=5
    ).SerializeToString()
    expected = recipe.reference_answer_bytes(stack.gateway_addr, request, LOAD)
    result = recipe.run_h2load(
        stack.gateway_addr, request, total=40, clients=2, streams=2, token=LOAD,
        h2load=h2load,
    )  # fmt: skip
    assert result.succeeded == result.status_2xx == 40
    assert result.data_bytes == 40 * expected
    # Without the token every call fails in gRPC terms while HTTP says 200 to all:
    # only the missing answer bytes show it.
    refused = recipe.run_h2load(
        stack.gateway_addr, request, total=4, clients=1, token=None, h2load=h2load
    )
    assert refused.status_2xx == 4 and refused.data_bytes == 0


def test_ghz_payload_script_writes_check_detect_and_similar_data(
    stack: LocalStack, images: Path, tmp_path: Path
) -> None:
    script = _load_script("make_payloads")
    out = tmp_path / "payloads"
    rc = script.main(
        ["--images", str(images), "--count", "3", "--encoder", stack.encoder_addr,
         "--token", INTERNAL, "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    for name, field in (
        ("check", "image"),
        ("detect", "query"),
        ("similar", "query"),
    ):
        docs = json.loads((out / f"{name}.json").read_text())
        assert len(docs) == 3 and all(field in d for d in docs)
    for config in ("check", "detect", "similar"):
        ghz = json.loads(
            (ROOT / "deploy" / "loadtest" / f"ghz-{config}.json").read_text()
        )
        assert ghz["data-file"] == f"artifacts/loadtest/{config}.json"
        assert "proto" not in ghz and "protoset" not in ghz  # server reflection
