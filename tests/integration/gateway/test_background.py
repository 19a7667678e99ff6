"""The query's background similarity reaches the decision: a bundle with a background
bank -> the encoder's DetectionKeys.background -> the gateway's stage 2 (cosine -
background_weight x background >= min_cosine) and the evidence. Real encoder (tiny
ONNX bundle with a bank), real index shard on a real redis-server, real gateway."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio

from copyfree.bundle import Thresholds
from copyfree.v1 import encoder_pb2, gateway_pb2
from copyfree_index.embedded_redis import RedisProcess
from tests.integration.gateway.stack import Stack, running_stack
from tests.utils.images import make_image_bytes

pytestmark = [pytest.mark.redis, pytest.mark.asyncio(loop_scope="module")]

# Radius 64: the one registered work is always the stage-1 candidate, and stage 2
# always applies (require_second_key), so only the cosine bar decides.
WEIGHTED = Thresholds(
    max_hamming=64,
    min_cosine=0.0,
    fallback_k=16,
    require_second_key=True,
    background_weight=0.5,
)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisProcess
) -> AsyncIterator[Stack]:
    root = tmp_path_factory.mktemp("background")
    bank = [make_image_bytes(s) for s in range(40, 52)]
    async with running_stack(
        root, redis_server.url, WEIGHTED, make_image_bytes(1), background=bank
    ) as running:
        running.images["other"] = make_image_bytes(2)
        yield running


async def _check(stack: Stack, **fields: object) -> gateway_pb2.CheckResponse:
    request = gateway_pb2.CheckRequest(image=stack.images["other"], **fields)  # type: ignore[arg-type]
    return await stack.gateway.Check(request, timeout=10)


async def test_the_background_raises_the_bar_and_a_request_can_set_its_weight(
    stack: Stack,
) -> None:
    encoded = await stack.encoder.Encode(
        encoder_pb2.EncodeRequest(
            image=stack.images["other"], outputs=[encoder_pb2.ENCODE_OUTPUT_DETECTION]
        ),
        timeout=10,
    )
    background = encoded.encoding.detection.background
    assert 0.0 < background <= 1.0
    first = await _check(stack, background_weight=0.0, min_cosine=-1.0)
    cosine = first.evidence.top_candidates[0].cosine
    # A bar between cosine and cosine + 0.5 x background: the weight decides.
    t2 = cosine - 0.25 * background
    plain = await _check(stack, background_weight=0.0, min_cosine=t2)
    weighted = await _check(stack, min_cosine=t2)
    assert plain.verdict == gateway_pb2.VERDICT_REGISTERED
    assert weighted.verdict == gateway_pb2.VERDICT_UNVERIFIED
    assert weighted.evidence.thresholds.background_weight == pytest.approx(0.5)
    assert plain.evidence.thresholds.background_weight == 0.0
    for reply in (plain, weighted):
        assert reply.evidence.background == pytest.approx(background)
        assert reply.evidence.stage == gateway_pb2.DECISION_STAGE_SECOND_KEY


async def test_the_registered_work_matches_with_the_bundle_weight(
    stack: Stack,
) -> None:
    reply = await stack.gateway.Check(
        gateway_pb2.CheckRequest(image=stack.images["work"]), timeout=10
    )
    assert reply.verdict == gateway_pb2.VERDICT_REGISTERED
    assert reply.match.id == "work" and reply.evidence.background > 0.0


async def test_a_weight_out_of_range_is_invalid_argument(stack: Stack) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await _check(stack, background_weight=1.5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "background_weight" in (e.value.details() or "")
