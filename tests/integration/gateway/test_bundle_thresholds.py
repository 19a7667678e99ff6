"""The detection bundle's thresholds reach the decision: encoder ModelInfo -> gateway ->
Check, with a request able to tighten the rule but not relax it. Real encoder (tiny
ONNX bundle), real index shard on a real redis-server, real gateway, all on ephemeral
loopback ports in this process."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from copyfree.bundle import Thresholds
from copyfree.v1 import gateway_pb2
from copyfree_index.embedded_redis import RedisProcess
from tests.integration.gateway.stack import Stack, running_stack
from tests.utils.images import make_image_bytes

pytestmark = [pytest.mark.redis, pytest.mark.asyncio(loop_scope="module")]

# Radius 64 puts every registered work in stage 1: with one work registered, any query
# has exactly one stage-1 candidate, the case the paper decides on Hamming alone.
STRICT = Thresholds(
    max_hamming=64, min_cosine=0.999, fallback_k=16, require_second_key=True
)


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
