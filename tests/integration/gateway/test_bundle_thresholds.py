"""The detection bundle's thresholds reach the decision: encoder ModelInfo -> gateway ->
Check, with a request able to tighten the rule but not relax it. Real encoder (tiny
ONNX bundle), real index shard on a real redis-server, real gateway, all on ephemeral
loopback ports in this process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from copyfree.bundle import Thresholds
from copyfree.serving.server import RunningServer, start_server
from copyfree.v1 import common_pb2, encoder_pb2_grpc, gateway_pb2, gateway_pb2_grpc
from copyfree_encoder.app import EncoderApp
from copyfree_encoder.settings import EncoderSettings
from copyfree_gateway.__main__ import start as start_gateway
from copyfree_gateway.settings import GatewaySettings
from copyfree_index.embedded_redis import RedisProcess
from copyfree_index.servicer import IndexServicer, as_service
from copyfree_index.settings import IndexSettings
from copyfree_index.shard import ShardIndex
from copyfree_index.store import RedisShardStore
from tests.utils.images import make_image_bytes
from tests.utils.tiny_bundles import make_detection_bundle, make_retrieval_bundle

pytestmark = [pytest.mark.redis, pytest.mark.asyncio(loop_scope="module")]

# Radius 64 puts every registered work in stage 1: with one work registered, any query
# has exactly one stage-1 candidate, the case the paper decides on Hamming alone.
STRICT = Thresholds(
    max_hamming=64, min_cosine=0.999, fallback_k=16, require_second_key=True
)


@dataclass
class Stack:
    gateway: gateway_pb2_grpc.GatewayServiceStub
    encoder: encoder_pb2_grpc.EncoderServiceStub
    images: dict[str, bytes]


@asynccontextmanager
async def running_stack(
    root: Path, redis_url: str, thresholds: Thresholds, registered: bytes
) -> AsyncIterator[Stack]:
    """Encoder (tiny bundles, the detection one with `thresholds`), one index shard,
    gateway; `registered` is in the registry as "work"."""
    encoder = await EncoderApp.start(
        EncoderSettings(
            host="127.0.0.1",
            port=0,
            detection_bundle=make_detection_bundle(root / "det", thresholds=thresholds),
            retrieval_bundle=make_retrieval_bundle(root / "ret", bits=16),
            providers="cpu",
            batch_wait_ms=1.0,
        )
    )
    await encoder.load()
    store = RedisShardStore.from_url(redis_url, shard_id=0)
    index_settings = IndexSettings(host="127.0.0.1", port=0, shard_id=0, num_shards=1)
    servicer = IndexServicer(ShardIndex(), store, index_settings)
    index: RunningServer = await start_server(index_settings, [as_service(servicer)])
    await servicer.load()
    await index.mark_serving()
    gateway, gateway_servicer = await start_gateway(
        GatewaySettings(
            host="127.0.0.1",
            port=0,
            encoder_addr=f"127.0.0.1:{encoder.port}",
            index_addrs=[f"127.0.0.1:{index.port}"],
            call_timeout_s=10.0,
        )
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}")
    encoder_channel = grpc.aio.insecure_channel(f"127.0.0.1:{encoder.port}")
    stub = gateway_pb2_grpc.GatewayServiceStub(channel)
    for collection, kind, image_id, image in (
        ("registry", common_pb2.COLLECTION_KIND_REGISTRY, "work", registered),
        ("copyright-free", common_pb2.COLLECTION_KIND_COPYRIGHT_FREE, "free", None),
    ):
        request = gateway_pb2.RegisterRequest(
            collection=collection,
            kind=kind,
            id=image_id,
            image=image or make_image_bytes(3),
        )
        reply = await stub.Register(iter([request]), timeout=30)
        assert reply.registered == 1
    try:
        yield Stack(
            stub,
            encoder_pb2_grpc.EncoderServiceStub(encoder_channel),
            {"work": registered},
        )
    finally:
        await channel.close()
        await encoder_channel.close()
        await gateway.stop()
        await gateway_servicer.close()
        await index.stop()
        await encoder.stop()
        store.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisProcess
) -> AsyncIterator[Stack]:
    root = tmp_path_factory.mktemp("thresholds")
    async with running_stack(
        root, redis_server.url, STRICT, make_image_bytes(1)
    ) as running:
        running.images["other"] = make_image_bytes(2)
        yield running


async def test_the_bundle_requires_the_second_key_for_a_unique_candidate(
    stack: Stack,
) -> None:
    reply = await stack.gateway.Check(
        gateway_pb2.CheckRequest(image=stack.images["other"]), timeout=10
    )
    ev = reply.evidence
    assert ev.stage1_candidates == 1  # the paper rule would answer "work" here
    assert ev.stage == gateway_pb2.DECISION_STAGE_SECOND_KEY
    assert ev.top_candidates[0].cosine < STRICT.min_cosine
    assert reply.verdict == gateway_pb2.VERDICT_UNVERIFIED
    assert ev.thresholds.require_second_key
    assert ev.thresholds.max_hamming == 64
    assert ev.thresholds.min_cosine == pytest.approx(0.999)


async def test_the_registered_work_itself_still_matches(stack: Stack) -> None:
    reply = await stack.gateway.Check(
        gateway_pb2.CheckRequest(image=stack.images["work"]), timeout=10
    )
    assert reply.verdict == gateway_pb2.VERDICT_REGISTERED
    assert reply.match.id == "work"


async def test_a_request_cannot_relax_the_bundle_rule_but_can_change_t2(
    stack: Stack,
) -> None:
    # require_second_key=False is proto3's default: it cannot switch the bundle's off.
    relaxed = await stack.gateway.Check(
        gateway_pb2.CheckRequest(
            image=stack.images["other"], require_second_key=False, min_cosine=-1.0
        ),
        timeout=10,
    )
    assert relaxed.evidence.thresholds.require_second_key
    assert relaxed.evidence.stage == gateway_pb2.DECISION_STAGE_SECOND_KEY
    # ... but T2 = -1 accepts any cosine, so stage 2 now matches the only candidate.
    assert relaxed.verdict == gateway_pb2.VERDICT_REGISTERED
