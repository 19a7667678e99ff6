"""The border-trimmed view through the real stack: a registered work pasted on a slide
(a white margin) is REGISTERED through its trimmed keys when the bundle's thresholds
turn the view on, and the evidence says so. Real encoder (tiny ONNX bundle), index
shard on a real redis-server and gateway, on ephemeral loopback ports."""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np
import pytest
import pytest_asyncio
from prometheus_client import REGISTRY

from copyfree.bundle import Thresholds
from copyfree.codes import second_key_from_bytes
from copyfree.v1 import encoder_pb2, gateway_pb2
from copyfree_index.embedded_redis import RedisProcess
from tests.integration.gateway.stack import Stack, running_stack
from tests.utils.images import encode, framed, make_picture

pytestmark = [pytest.mark.redis, pytest.mark.asyncio(loop_scope="module")]

# Every registered work is a stage-1 candidate and must reach T2 = 0.999: only a
# near-exact second key matches, which the framed copy as is does not have.
WITH_VIEW = Thresholds(
    max_hamming=64,
    min_cosine=0.999,
    fallback_k=16,
    require_second_key=True,
    trimmed_view=True,
)
WORK = make_picture(21)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisProcess
) -> AsyncIterator[Stack]:
    root = tmp_path_factory.mktemp("trimmed")
    async with running_stack(root, redis_server.url, WITH_VIEW, encode(WORK)) as s:
        s.images["on a slide"] = encode(framed(WORK, (60, 40, 60, 40)), "PNG")
        s.images["framed other"] = encode(framed(make_picture(22)), "PNG")
        yield s


def _trimmed_view_count(outcome: str) -> float:
    value = REGISTRY.get_sample_value(
        "copyfree_check_trimmed_view_total", {"outcome": outcome}
    )
    return value or 0.0


async def _cosine_as_is(stack: Stack, copy: bytes) -> float:
    """Cosine between the second keys of the copy as is and of the registered work."""
    keys = []
    for image in (stack.images["work"], copy):
        reply = await stack.encoder.Encode(
            encoder_pb2.EncodeRequest(
                image=image, outputs=[encoder_pb2.ENCODE_OUTPUT_DETECTION]
            ),
            timeout=10,
        )
        keys.append(second_key_from_bytes(reply.encoding.detection.second_key))
    a, b = (k.astype(np.float64) for k in keys)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


async def test_a_copy_on_a_slide_is_registered_through_its_trimmed_view(
    stack: Stack,
) -> None:
    copy = stack.images["on a slide"]
    assert await _cosine_as_is(stack, copy) < WITH_VIEW.min_cosine  # as is: no match
    before = _trimmed_view_count("matched")
    reply = await stack.gateway.Check(gateway_pb2.CheckRequest(image=copy), timeout=10)
    assert _trimmed_view_count("matched") == before + 1
    assert reply.verdict == gateway_pb2.VERDICT_REGISTERED
    assert reply.match.id == "work"
    assert reply.match.cosine == pytest.approx(1.0, abs=1e-4)
    assert reply.evidence.trimmed
    assert reply.evidence.thresholds.trimmed_view


async def test_the_work_itself_matches_as_is(stack: Stack) -> None:
    reply = await stack.gateway.Check(
        gateway_pb2.CheckRequest(image=stack.images["work"]), timeout=10
    )
    assert reply.verdict == gateway_pb2.VERDICT_REGISTERED
    assert not reply.evidence.trimmed


async def test_another_framed_picture_stays_unverified(stack: Stack) -> None:
    reply = await stack.gateway.Check(
        gateway_pb2.CheckRequest(image=stack.images["framed other"], top_n=3),
        timeout=10,
    )
    assert reply.verdict == gateway_pb2.VERDICT_UNVERIFIED
    assert not reply.evidence.trimmed
    assert _trimmed_view_count("unmatched") >= 1
    assert len(reply.recommendations) == 1  # the one copyright-free item
