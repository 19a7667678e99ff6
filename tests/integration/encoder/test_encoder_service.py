"""The encoder through its real gRPC surface on 127.0.0.1:0, with the tiny bundles."""

from __future__ import annotations

import asyncio
import os
import struct
import subprocess
import sys
import zlib
from collections.abc import AsyncIterator, Callable
from functools import cache
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from copyfree import codes
from copyfree.v1 import common_pb2, encoder_pb2, encoder_pb2_grpc
from copyfree_encoder.app import EncoderApp, serve
from copyfree_encoder.model import EncodedImage
from copyfree_encoder.servicer import ENCODER_SERVICE_NAME
from copyfree_encoder.settings import EncoderSettings
from tests.utils.images import (
    encode,
    framed,
    jpeg_copy,
    make_image_bytes,
    make_picture,
)
from tests.utils.tiny_bundles import (
    DETECTION_NAME,
    RETRIEVAL_NAME,
    TINY_VERSION,
    make_detection_bundle,
    make_retrieval_bundle,
)

MAX_IMAGE_BYTES = 2 * 1024 * 1024
MAX_BATCH = 8
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
BOTH = [encoder_pb2.ENCODE_OUTPUT_DETECTION, encoder_pb2.ENCODE_OUTPUT_RETRIEVAL]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles")
    return {
        "detection": make_detection_bundle(root / "detection"),
        "retrieval": make_retrieval_bundle(root / "retrieval"),
    }


def _settings(bundles: dict[str, Path], **overrides: object) -> EncoderSettings:
    values: dict[str, object] = {
        "host": "127.0.0.1",
        "port": 0,
        "detection_bundle": bundles["detection"],
        "retrieval_bundle": bundles["retrieval"],
        "max_image_bytes": MAX_IMAGE_BYTES,
        "max_batch": MAX_BATCH,
        "batch_wait_ms": 5.0,
        "providers": "cpu",
        "shutdown_grace_s": 1.0,
    }
    values.update(overrides)
    return EncoderSettings(**values)  # type: ignore[arg-type]


@pytest.fixture
async def app(bundles: dict[str, Path]) -> AsyncIterator[EncoderApp]:
    app = await EncoderApp.start(_settings(bundles))
    await app.load()
    yield app
    await app.stop()


@pytest.fixture
async def channel(app: EncoderApp) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(app.address) as channel:
        yield channel


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> encoder_pb2_grpc.EncoderServiceStub:
    return encoder_pb2_grpc.EncoderServiceStub(channel)


async def _health(channel: grpc.aio.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return reply.status


def _bits_apart(a: bytes, b: bytes) -> int:
    return int(
        np.unpackbits(np.frombuffer(a, np.uint8) ^ np.frombuffer(b, np.uint8)).sum()
    )


@cache
def _png_bomb(side: int = 30000) -> bytes:
    """~110 KB of valid PNG declaring side x side 1-bit pixels (900M for 30000)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    rows = bytes(1 + (side + 7) // 8) * 1000
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(rows) for _ in range(side // 1000))
    idat += compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    signature = b"\x89PNG\r\n\x1a\n"
    return (
        signature + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


# --- lifecycle: health, reflection, serve() ---------------------------------------


async def test_health_goes_from_not_serving_to_serving(
    bundles: dict[str, Path],
) -> None:
    app = await EncoderApp.start(_settings(bundles))
    try:
        async with grpc.aio.insecure_channel(app.address) as channel:
            assert await _health(channel, "") == SERVING  # liveness: process answers
            assert await _health(channel, ENCODER_SERVICE_NAME) == NOT_SERVING
            stub = encoder_pb2_grpc.EncoderServiceStub(channel)
            request = encoder_pb2.EncodeRequest(image=make_image_bytes(1))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Encode(request, timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "loading" in (err.value.details() or "")

            await app.load()

            assert await _health(channel, ENCODER_SERVICE_NAME) == SERVING
            assert (await stub.Encode(request, timeout=5)).encoding.width == 160
    finally:
        await app.stop()


async def test_reflection_lists_the_encoder_service(channel: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    names: set[str] = set()
    async for reply in stub.ServerReflectionInfo(iter([request]), timeout=5):
        names.update(s.name for s in reply.list_services_response.service)
    assert ENCODER_SERVICE_NAME in names
    assert "grpc.health.v1.Health" in names
    assert encoder_pb2.DESCRIPTOR.services_by_name["EncoderService"].full_name == (
        ENCODER_SERVICE_NAME
    )


async def test_serve_runs_until_asked_to_stop(bundles: dict[str, Path]) -> None:
    ready = asyncio.Event()
    apps: list[EncoderApp] = []
    task = asyncio.create_task(serve(_settings(bundles), ready, on_ready=apps.append))
    await asyncio.wait_for(ready.wait(), 20)
    (app,) = apps
    async with grpc.aio.insecure_channel(app.address) as channel:
        assert await _health(channel, ENCODER_SERVICE_NAME) == SERVING
        app.request_stop()
        await asyncio.wait_for(task, 10)
    assert task.done() and task.exception() is None


async def test_serve_can_be_cancelled(bundles: dict[str, Path]) -> None:
    ready = asyncio.Event()
    task = asyncio.create_task(serve(_settings(bundles), ready))
    await asyncio.wait_for(ready.wait(), 20)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_main_refuses_a_bad_bundle_with_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("{}")
    env = {
        **os.environ,
        "ENCODER_DETECTION_BUNDLE": str(tmp_path),
        "ENCODER_HOST": "127.0.0.1",
        "ENCODER_PORT": "0",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "copyfree_encoder"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    assert "cannot serve the model bundles" in proc.stdout
    assert str(tmp_path) in proc.stdout


# --- the RPCs ----------------------------------------------------------------------


async def test_encode_fills_every_field(
    app: EncoderApp, stub: encoder_pb2_grpc.EncoderServiceStub
) -> None:
    data = make_image_bytes(3)
    reply = await stub.Encode(encoder_pb2.EncodeRequest(image=data), timeout=5)
    e = reply.encoding

    assert (e.width, e.height) == (160, 120)
    assert len(e.detection.first_key) == 8
    assert len(e.detection.second_key) == 128
    assert len(e.embedding) == 64
    assert e.retrieval.code_bits == 16 and len(e.retrieval.code) == 2
    assert len(e.retrieval.fine) == 16
    assert e.detection_model == common_pb2.ModelRef(
        name=DETECTION_NAME, version=TINY_VERSION
    )
    assert e.retrieval_model == common_pb2.ModelRef(
        name=RETRIEVAL_NAME, version=TINY_VERSION
    )
    # The wire form is the in-process result, byte for byte.
    assert app.encoder is not None
    (local,) = app.encoder.encode_images([data])
    assert isinstance(local, EncodedImage) and local.second_key is not None
    assert e.detection.first_key == local.first_key
    assert e.detection.second_key == codes.second_key_to_bytes(local.second_key)
    assert local.embedding is not None
    assert np.array_equal(np.asarray(e.embedding, np.float32), local.embedding)
    assert (e.retrieval.code, e.retrieval.fine) == (local.code, local.fine)
    # ...and the keys are the copyfree.codes keys of the returned embedding.
    theta = np.zeros(64, dtype=np.float32)
    embedding = np.asarray(e.embedding, dtype=np.float32)
    assert e.detection.first_key == codes.first_key(embedding, theta).tobytes()


async def test_encode_only_what_was_asked(
    stub: encoder_pb2_grpc.EncoderServiceStub,
) -> None:
    data = make_image_bytes(4)
    det = await stub.Encode(
        encoder_pb2.EncodeRequest(
            image=data, outputs=[encoder_pb2.ENCODE_OUTPUT_DETECTION]
        ),
        timeout=5,
    )
    ret = await stub.Encode(
        encoder_pb2.EncodeRequest(
            image=data, outputs=[encoder_pb2.ENCODE_OUTPUT_RETRIEVAL]
        ),
        timeout=5,
    )
    both = await stub.Encode(
        encoder_pb2.EncodeRequest(image=data, outputs=BOTH), timeout=5
    )
    assert det.encoding.HasField("detection") and not det.encoding.HasField("retrieval")
    assert not det.encoding.HasField("retrieval_model")
    assert ret.encoding.HasField("retrieval") and not ret.encoding.HasField("detection")
    assert len(ret.encoding.embedding) == 0
    assert both.encoding.detection == det.encoding.detection
    assert both.encoding.retrieval == ret.encoding.retrieval


async def test_a_jpeg_copy_encodes_within_a_few_bits(
    stub: encoder_pb2_grpc.EncoderServiceStub,
) -> None:
    data = make_image_bytes(8)
    a = (await stub.Encode(encoder_pb2.EncodeRequest(image=data), timeout=5)).encoding
    b = (
        await stub.Encode(encoder_pb2.EncodeRequest(image=jpeg_copy(data)), timeout=5)
    ).encoding
    assert _bits_apart(a.detection.first_key, b.detection.first_key) <= 4
    assert _bits_apart(a.retrieval.code, b.retrieval.code) <= 2


async def test_encode_batch_keeps_order_and_reports_bad_items(
    stub: encoder_pb2_grpc.EncoderServiceStub,
) -> None:
    images = [make_image_bytes(s) for s in range(20)]
    images[3] = b""
    images[11] = b"not an image"
    reply = await stub.EncodeBatch(
        encoder_pb2.EncodeBatchRequest(images=images), timeout=10
    )

    assert len(reply.results) == 20
    for i, result in enumerate(reply.results):
        if i in (3, 11):
            assert result.WhichOneof("result") == "error"
            assert result.error.code == "INVALID_ARGUMENT"
        else:
            single = await stub.Encode(
                encoder_pb2.EncodeRequest(image=images[i]), timeout=5
            )
            assert result.encoding == single.encoding
    assert "empty" in reply.results[3].error.message
    assert "not a JPEG" in reply.results[11].error.message


TRIMMED = [
    encoder_pb2.ENCODE_OUTPUT_DETECTION,
    encoder_pb2.ENCODE_OUTPUT_DETECTION_TRIMMED,
]


async def test_a_framed_copy_has_trimmed_keys_equal_to_the_original(
    stub: encoder_pb2_grpc.EncoderServiceStub,
) -> None:
    picture = make_picture(7)
    original = encode(picture)
    copy = encode(framed(picture, (30, 10, 30, 10)))

    async def keys(data: bytes, outputs: list[int]) -> encoder_pb2.Encoding:
        request = encoder_pb2.EncodeRequest(image=data, outputs=outputs)
        return (await stub.Encode(request, timeout=5)).encoding

    plain = await keys(original, TRIMMED)
    both = await keys(copy, TRIMMED)
    assert not plain.HasField("trimmed_detection")  # no border, no second view
    assert both.HasField("trimmed_detection")
    assert both.trimmed_detection == plain.detection
    assert both.detection != plain.detection
    assert both.width == picture.width + 60  # the image's own size, not the view's
    as_asked = await keys(copy, [encoder_pb2.ENCODE_OUTPUT_DETECTION])
    assert not as_asked.HasField("trimmed_detection")
    assert as_asked.detection == both.detection


async def test_the_trimmed_view_alone_runs_no_other_model(
    stub: encoder_pb2_grpc.EncoderServiceStub,
) -> None:
    """The gateway's second encode of an unmatched image: the trimmed view and the
    retrieval code, not the detection keys it already has."""
    picture = make_picture(9)
    copy = encode(framed(picture))
    only = encoder_pb2.ENCODE_OUTPUT_DETECTION_TRIMMED

    async def encoding(data: bytes, outputs: list[int]) -> encoder_pb2.Encoding:
        request = encoder_pb2.EncodeRequest(image=data, outputs=outputs)
        return (await stub.Encode(request, timeout=5)).encoding

    alone = await encoding(copy, [only])
    assert alone.HasField("trimmed_detection") and not alone.HasField("detection")
    assert not alone.HasField("retrieval")
    assert alone.detection_model.version == TINY_VERSION
    both = await encoding(copy, [only, encoder_pb2.ENCODE_OUTPUT_RETRIEVAL])
    assert both.trimmed_detection == alone.trimmed_detection
    assert both.HasField("retrieval") and not both.HasField("detection")
    bare = await encoding(encode(picture), [only])  # no border: nothing to run
    assert not bare.HasField("trimmed_detection") and not bare.HasField("detection")
    assert (bare.width, bare.height) == picture.size


async def test_encode_batch_gives_trimmed_keys_item_by_item(
    stub: encoder_pb2_grpc.EncoderServiceStub,
) -> None:
    images = [
        encode(framed(make_picture(s))) if s % 2 else make_image_bytes(s)
        for s in range(6)
    ]
    images[2] = b"not an image"
    reply = await stub.EncodeBatch(
        encoder_pb2.EncodeBatchRequest(images=images, outputs=TRIMMED), timeout=10
    )
    assert reply.results[2].WhichOneof("result") == "error"
    for i, result in enumerate(reply.results):
        if i == 2:
            continue
        single = await stub.Encode(
            encoder_pb2.EncodeRequest(image=images[i], outputs=TRIMMED), timeout=5
        )
        assert result.encoding == single.encoding
        assert result.encoding.HasField("trimmed_detection") == bool(i % 2)


async def test_encode_batch_limits_its_size(
    stub: encoder_pb2_grpc.EncoderServiceStub,
) -> None:
    request = encoder_pb2.EncodeBatchRequest(images=[b"x"] * (MAX_BATCH * 8 + 1))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.EncodeBatch(request, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"limit is {MAX_BATCH * 8}" in (err.value.details() or "")
    empty = await stub.EncodeBatch(encoder_pb2.EncodeBatchRequest(), timeout=5)
    assert len(empty.results) == 0


async def test_model_info_describes_both_bundles(
    stub: encoder_pb2_grpc.EncoderServiceStub, bundles: dict[str, Path]
) -> None:
    reply = await stub.ModelInfo(encoder_pb2.ModelInfoRequest(), timeout=5)
    det, ret = reply.models
    assert det.kind == "detection" and ret.kind == "retrieval"
    assert det.model.name == DETECTION_NAME and det.model.version == TINY_VERSION
    assert det.code_bits == 64
    assert det.thresholds.max_hamming == 12
    assert det.thresholds.min_cosine == pytest.approx(0.9)
    assert det.thresholds.fallback_k == 16
    assert not ret.HasField("thresholds")
    assert (ret.code_bits, ret.fine_dim) == (16, 16)
    assert det.execution_provider == ret.execution_provider == "CPUExecutionProvider"
    manifest_text = (bundles["detection"] / "manifest.json").read_text()
    assert det.manifest_json == manifest_text


async def test_detection_only_encoder_refuses_retrieval(
    bundles: dict[str, Path],
) -> None:
    app = await EncoderApp.start(_settings(bundles, retrieval_bundle=None))
    try:
        await app.load()
        async with grpc.aio.insecure_channel(app.address) as channel:
            stub = encoder_pb2_grpc.EncoderServiceStub(channel)
            data = make_image_bytes(1)
            plain = await stub.Encode(encoder_pb2.EncodeRequest(image=data), timeout=5)
            assert plain.encoding.HasField("detection")
            assert not plain.encoding.HasField("retrieval")
            request = encoder_pb2.EncodeRequest(image=data, outputs=BOTH)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Encode(request, timeout=5)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "no retrieval model" in (err.value.details() or "")
            info = await stub.ModelInfo(encoder_pb2.ModelInfoRequest(), timeout=5)
            assert [m.kind for m in info.models] == ["detection"]
    finally:
        await app.stop()


# --- bad input -----------------------------------------------------------------------


BAD_IMAGES: dict[str, tuple[Callable[[], bytes], str]] = {
    "empty": (lambda: b"", "empty"),
    "not-an-image": (lambda: b"just some text, no picture" * 5, "not a JPEG, PNG"),
    "truncated-jpeg": (
        lambda: make_image_bytes(2, "JPEG", (320, 240))[:1500],
        "truncated",
    ),
    "decompression-bomb": (_png_bomb, "30000x30000"),
    "over-max-bytes": (lambda: b"\xff\xd8\xff" + bytes(MAX_IMAGE_BYTES), "limit is"),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
async def test_bad_images_are_invalid_argument_and_the_server_carries_on(
    stub: encoder_pb2_grpc.EncoderServiceStub, case: str
) -> None:
    make, words = BAD_IMAGES[case]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Encode(encoder_pb2.EncodeRequest(image=make()), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.value.details() or ""
    assert words in details or (case == "decompression-bomb" and "pixels" in details)
    assert "image" in details

    reply = await stub.Encode(
        encoder_pb2.EncodeRequest(image=make_image_bytes(9)), timeout=5
    )
    assert len(reply.encoding.detection.first_key) == 8


async def test_unknown_output_value_is_invalid_argument(
    stub: encoder_pb2_grpc.EncoderServiceStub,
) -> None:
    request = encoder_pb2.EncodeRequest(image=make_image_bytes(1), outputs=[1, 7])  # type: ignore[list-item]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Encode(request, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "outputs[1] = 7" in (err.value.details() or "")


# --- micro-batching ------------------------------------------------------------------


async def test_concurrent_encodes_are_micro_batched_with_identical_results(
    app: EncoderApp, stub: encoder_pb2_grpc.EncoderServiceStub
) -> None:
    images = [make_image_bytes(100 + s) for s in range(24)]
    sequential = [
        (await stub.Encode(encoder_pb2.EncodeRequest(image=data), timeout=5)).encoding
        for data in images
    ]
    assert app.encoder is not None and app.encoder.detection is not None
    stats = app.encoder.detection.stats
    assert stats.largest_batch == 1  # one at a time: nothing to merge
    runs_before = stats.runs

    replies = await asyncio.gather(
        *(
            stub.Encode(encoder_pb2.EncodeRequest(image=data), timeout=10)
            for data in images
        )
    )

    assert 1 < stats.largest_batch <= MAX_BATCH
    assert stats.runs - runs_before < len(images)
    assert [r.encoding for r in replies] == sequential


# --- the background bank -------------------------------------------------------------


async def test_a_bundle_with_a_background_bank_reports_each_views_background(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    """With background.npy in the bundle, every detection view carries its background
    similarity (mean cosine to the top_k nearest bank keys), as BackgroundBank
    computes it; without one it stays 0."""
    from copyfree.background import BackgroundBank, write_bank
    from copyfree.bundle import read_manifest
    from copyfree_encoder.model import Encoder

    bundle = make_detection_bundle(tmp_path / "banked")
    plain = Encoder.load(_settings(bundles))
    pictures = [make_image_bytes(seed=s) for s in range(20, 30)]
    bank_keys = np.stack(
        [e.second_key for e in plain.encode_images(pictures, ["detection"])]  # type: ignore[union-attr]
    )
    write_bank(bundle, bank_keys, 3, {"source": "test pictures"})
    bank = BackgroundBank.load(bundle, read_manifest(bundle))
    assert bank is not None and bank.top_k == 3 and len(bank.keys) == 10
    app = await EncoderApp.start(_settings(bundles, detection_bundle=bundle))
    await app.load()
    try:
        async with grpc.aio.insecure_channel(app.address) as channel:
            stub = encoder_pb2_grpc.EncoderServiceStub(channel)
            picture = make_picture(7)
            copy = encode(framed(picture, (30, 10, 30, 10)))
            request = encoder_pb2.EncodeRequest(image=copy, outputs=TRIMMED)
            got = (await stub.Encode(request, timeout=5)).encoding
            # a bank image as a query: its own key is its nearest bank key
            own = encoder_pb2.EncodeRequest(image=pictures[0], outputs=TRIMMED[:1])
            member = (await stub.Encode(own, timeout=5)).encoding
    finally:
        await app.stop()
    for keys in (got.detection, got.trimmed_detection, member.detection):
        second = np.frombuffer(keys.second_key, "<i2")[None, :]
        assert keys.background == pytest.approx(float(bank.similarity(second)[0]))
    assert got.detection.background != got.trimmed_detection.background
    assert member.detection.background > got.detection.background
    # the bank changes no key: same keys as the bundle without a bank
    unbanked = plain.encode_images([copy], ["detection"])[0]
    assert isinstance(unbanked, EncodedImage) and unbanked.background is None
    assert got.detection.second_key == codes.second_key_to_bytes(unbanked.second_key)
