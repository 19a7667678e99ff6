"""One gateway stack for the gateway's integration tests: a real encoder with the tiny
ONNX bundles (the detection one with given thresholds), one index shard on a real
redis-server and the gateway, all on ephemeral loopback ports in this process."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from copyfree.background import write_bank
from copyfree.bundle import Thresholds
from copyfree.preprocess import decode, to_input
from copyfree.serving.server import RunningServer, start_server
from copyfree.v1 import common_pb2, encoder_pb2_grpc, gateway_pb2, gateway_pb2_grpc
from copyfree_encoder.app import EncoderApp
from copyfree_encoder.model import BundleModel
from copyfree_encoder.settings import EncoderSettings
from copyfree_gateway.__main__ import start as start_gateway
from copyfree_gateway.settings import GatewaySettings
from copyfree_index.servicer import IndexServicer, as_service
from copyfree_index.settings import IndexSettings
from copyfree_index.shard import ShardIndex
from copyfree_index.store import RedisShardStore
from tests.utils.images import make_image_bytes
from tests.utils.tiny_bundles import make_detection_bundle, make_retrieval_bundle


@dataclass
class Stack:
    gateway: gateway_pb2_grpc.GatewayServiceStub
    encoder: encoder_pb2_grpc.EncoderServiceStub
    images: dict[str, bytes]


@asynccontextmanager
async def running_stack(
    root: Path,
    redis_url: str,
    thresholds: Thresholds,
    registered: bytes,
    background: Sequence[bytes] = (),
) -> AsyncIterator[Stack]:
    """Encoder (tiny bundles, the detection one with `thresholds` and, when
    `background` images are given, a background bank of them), one index shard,
    gateway; `registered` is in the registry as "work"."""
    detection = make_detection_bundle(root / "det", thresholds=thresholds)
    if background:
        model = BundleModel(detection, providers="cpu")
        keys = model.run(
            np.stack([to_input(decode(b), model.spec) for b in background])
        )
        write_bank(detection, keys["second_key"], 3, {"source": "test images"})
    encoder = await EncoderApp.start(
        EncoderSettings(
            host="127.0.0.1",
            port=0,
            detection_bundle=detection,
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
