"""EncoderServicer: copyfree.v1.EncoderService over the Encoder and its MicroBatcher."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from copyfree.bundle import Kind
from copyfree.codes import second_key_to_bytes
from copyfree.errors import InvalidInput, Unavailable
from copyfree.serving import ServicerContext
from copyfree.serving.server import Service
from copyfree.v1 import common_pb2, encoder_pb2, encoder_pb2_grpc
from copyfree_encoder.model import (
    BundleModel,
    EncodedImage,
    Encoder,
    MicroBatcher,
    Prepared,
)
from copyfree_encoder.settings import EncoderSettings

ENCODER_SERVICE_NAME = "copyfree.v1.EncoderService"
BATCH_REQUEST_FACTOR = 8  # EncodeBatch takes up to max_batch * 8 images per request

_OUTPUT_KINDS: dict[int, Kind] = {
    encoder_pb2.ENCODE_OUTPUT_DETECTION: "detection",
    encoder_pb2.ENCODE_OUTPUT_RETRIEVAL: "retrieval",
}
TRIMMED = encoder_pb2.ENCODE_OUTPUT_DETECTION_TRIMMED


@dataclass(frozen=True)
class Outputs:
    kinds: frozenset[Kind]  # models to run on the image as is
    trimmed: bool  # the detection keys of the image without its uniform border


def parse_outputs(encoder: Encoder, values: Sequence[int]) -> Outputs:
    """EncodeOutput values -> what to run; UNSPECIFIED is ignored, unknown numbers are
    refused, none at all means every loaded model; FailedPrecondition for a model
    this encoder has not loaded."""
    kinds: list[Kind] = []
    for i, value in enumerate(values):
        if value in (encoder_pb2.ENCODE_OUTPUT_UNSPECIFIED, TRIMMED):
            continue
        if value not in _OUTPUT_KINDS:
            raise InvalidInput(f"outputs[{i}] = {value} is not a known EncodeOutput")
        kinds.append(_OUTPUT_KINDS[value])
    if TRIMMED not in values:
        return Outputs(encoder.resolve_outputs(kinds), False)
    encoder.model("detection")
    return Outputs(encoder.resolve_outputs(kinds) if kinds else frozenset(), True)


def model_ref(model: BundleModel) -> common_pb2.ModelRef:
    return common_pb2.ModelRef(name=model.manifest.name, version=model.manifest.version)


def describe(model: BundleModel) -> encoder_pb2.ModelDescription:
    m = model.manifest
    description = encoder_pb2.ModelDescription(
        model=model_ref(model),
        kind=m.kind,
        code_bits=m.code_bits,
        fine_dim=m.fine_dim,
        manifest_json=model.manifest_json,
        execution_provider=model.execution_provider,
    )
    if m.kind == "detection":
        description.thresholds.CopyFrom(common_pb2.Thresholds(**m.thresholds.to_dict()))
    return description


class EncoderServicer(encoder_pb2_grpc.EncoderServiceServicer):
    """Validates requests, decodes in worker threads, encodes through the MicroBatcher.

    Created before the models are loaded (the server answers health checks while they
    load); until attach() every RPC fails with UNAVAILABLE.
    """

    def __init__(self, settings: EncoderSettings) -> None:
        self._settings = settings
        self._encoder: Encoder | None = None
        self._batcher: MicroBatcher | None = None

    @property
    def encoder(self) -> Encoder | None:
        return self._encoder

    def attach(self, encoder: Encoder) -> None:
        """Start serving with loaded models (call from the event loop)."""
        batcher = MicroBatcher(
            encoder,
            max_batch=self._settings.max_batch,
            wait_s=self._settings.batch_wait_ms / 1000.0,
        )
        batcher.start()
        self._encoder, self._batcher = encoder, batcher

    async def aclose(self) -> None:
        if self._batcher is not None:
            await self._batcher.aclose()

    def _ready(self) -> tuple[Encoder, MicroBatcher]:
        if self._encoder is None or self._batcher is None:
            raise Unavailable("the encoder is still loading its models")
        return self._encoder, self._batcher

    async def Encode(
        self, request: encoder_pb2.EncodeRequest, context: ServicerContext
    ) -> encoder_pb2.EncodeResponse:
        encoder, batcher = self._ready()
        outputs = parse_outputs(encoder, request.outputs)
        prepared = await asyncio.to_thread(
            encoder.prepare, request.image, outputs.kinds, trimmed=outputs.trimmed
        )
        encoded = await batcher.submit_many(_with_trimmed([prepared]))
        return encoder_pb2.EncodeResponse(
            encoding=self._to_proto(encoder, prepared, iter(encoded))
        )

    async def EncodeBatch(
        self, request: encoder_pb2.EncodeBatchRequest, context: ServicerContext
    ) -> encoder_pb2.EncodeBatchResponse:
        encoder, batcher = self._ready()
        limit = self._settings.max_batch * BATCH_REQUEST_FACTOR
        if len(request.images) > limit:
            raise InvalidInput(
                f"images holds {len(request.images)} images, the limit is {limit}"
            )
        outputs = parse_outputs(encoder, request.outputs)

        async def prepare_one(data: bytes) -> Prepared | InvalidInput:
            try:
                return await asyncio.to_thread(
                    encoder.prepare, data, outputs.kinds, trimmed=outputs.trimmed
                )
            except InvalidInput as e:
                return e

        prepared = await asyncio.gather(*(prepare_one(data) for data in request.images))
        good = [p for p in prepared if isinstance(p, Prepared)]
        encoded = iter(await batcher.submit_many(_with_trimmed(good)))
        results = []
        for item in prepared:
            if isinstance(item, InvalidInput):
                error = encoder_pb2.ItemError(code=item.status, message=str(item))
                results.append(encoder_pb2.EncodeResult(error=error))
            else:
                encoding = self._to_proto(encoder, item, encoded)
                results.append(encoder_pb2.EncodeResult(encoding=encoding))
        return encoder_pb2.EncodeBatchResponse(results=results)

    async def ModelInfo(
        self, request: encoder_pb2.ModelInfoRequest, context: ServicerContext
    ) -> encoder_pb2.ModelInfoResponse:
        encoder, _ = self._ready()
        return encoder_pb2.ModelInfoResponse(
            models=[describe(m) for m in encoder.models]
        )

    @staticmethod
    def _to_proto(
        encoder: Encoder, item: Prepared, encoded: Iterator[EncodedImage]
    ) -> encoder_pb2.Encoding:
        """The Encoding of `item`, taking its results (and its trimmed view's) from
        `encoded`, in the order _with_trimmed() submitted them."""
        encoding = encoder_pb2.Encoding(width=item.width, height=item.height)
        det, ret = encoder.detection, encoder.retrieval
        e = next(encoded) if item.inputs else None
        if e is not None and det is not None and e.second_key is not None:
            encoding.detection.CopyFrom(_keys(e))
            if e.embedding is not None:
                encoding.embedding.extend(e.embedding.tolist())
            encoding.detection_model.CopyFrom(model_ref(det))
        if item.trimmed is not None and det is not None:
            encoding.trimmed_detection.CopyFrom(_keys(next(encoded)))
            encoding.detection_model.CopyFrom(model_ref(det))
        if e is not None and ret is not None and e.code is not None:
            assert e.fine is not None
            encoding.retrieval.CopyFrom(
                common_pb2.RetrievalCode(
                    code=e.code,
                    code_bits=ret.manifest.code_bits,
                    fine=e.fine,
                )
            )
            encoding.retrieval_model.CopyFrom(model_ref(ret))
        return encoding


def _with_trimmed(items: Sequence[Prepared]) -> list[Prepared]:
    """Each item (unless it asked only for a trimmed view) followed by its trimmed
    view, if any: one model run for both."""
    out: list[Prepared] = []
    for item in items:
        if item.inputs:
            out.append(item)
        if item.trimmed is not None:
            out.append(item.trimmed)
    return out


def _keys(e: EncodedImage) -> common_pb2.DetectionKeys:
    assert e.first_key is not None and e.second_key is not None
    return common_pb2.DetectionKeys(
        first_key=e.first_key,
        second_key=second_key_to_bytes(e.second_key),
        background=e.background or 0.0,
    )


def as_service(servicer: EncoderServicer) -> Service:
    return Service(
        ENCODER_SERVICE_NAME,
        encoder_pb2_grpc.add_EncoderServiceServicer_to_server,
        servicer,
    )
