"""GatewayServicer: Check (encode -> detect on every shard -> decide; when nothing
matched, one more encode for the border-trimmed view and the retrieval code -> detect
the view -> recommend when still unverified), Register (streaming bulk ingest),
Recommend, Delete, Stats, ModelInfo."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

from copyfree import errors
from copyfree.routing import MAX_ID_CHARS, shard_for
from copyfree.serving import ServicerContext
from copyfree.serving.logging import request_id
from copyfree.serving.metrics import CHECK_TRIMMED_VIEW, CHECK_VERDICTS
from copyfree.serving.server import Service
from copyfree.v1 import (
    common_pb2,
    encoder_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    index_pb2,
)
from copyfree_gateway import GATEWAY_SERVICE_NAME
from copyfree_gateway.clients import EncoderClient, IndexClient
from copyfree_gateway.decision import (
    Decision,
    decide,
    merge_similar,
    with_trimmed_view,
)
from copyfree_gateway.settings import GatewaySettings

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_TOP_N = 100
MAX_FALLBACK_K = 1000
DETECTION = encoder_pb2.ENCODE_OUTPUT_DETECTION
DETECTION_TRIMMED = encoder_pb2.ENCODE_OUTPUT_DETECTION_TRIMMED
RETRIEVAL = encoder_pb2.ENCODE_OUTPUT_RETRIEVAL


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(
        self,
        settings: GatewaySettings,
        encoder: EncoderClient,
        shards: Sequence[IndexClient],
    ) -> None:
        self._settings, self._encoder, self._shards = settings, encoder, list(shards)
        self._bundle_thresholds: dict[str, common_pb2.Thresholds] = {}

    # ---- fan-out -------------------------------------------------------------------

    async def _on_shards(
        self,
        collection: str,
        call: Callable[[IndexClient], Awaitable[T]],
        shards: Sequence[IndexClient] | None = None,
    ) -> list[T]:
        """Call every shard concurrently. A shard that has never seen the collection
        answers NOT_FOUND and contributes nothing; if all do, the collection is unknown.
        Any other failure fails the request (no silent partial answers)."""
        targets = self._shards if shards is None else list(shards)
        results = await asyncio.gather(
            *(call(s) for s in targets), return_exceptions=True
        )
        found: list[T] = []
        not_found = 0
        for r in results:
            if isinstance(r, errors.NotFound):
                not_found += 1
            elif isinstance(r, BaseException):
                raise r
            else:
                found.append(r)
        if targets and not_found == len(targets) and shards is None:
            raise errors.NotFound(
                f"collection {collection!r} not found on any of {len(targets)} shards "
                f"(register images into it first)"
            )
        return found

    # ---- Check / Recommend ---------------------------------------------------------

    def _top_n(self, requested: int) -> int:
        if requested == 0:
            return self._settings.default_top_n
        if not 1 <= requested <= MAX_TOP_N:
            raise errors.InvalidInput(
                f"top_n must be in [1, {MAX_TOP_N}], got {requested}"
            )
        return requested

    async def _load_bundle_thresholds(self) -> None:
        info = await self._encoder.model_info()
        for m in info.models:
            if m.kind == "detection":
                self._bundle_thresholds[m.model.version] = m.thresholds

    async def _thresholds(
        self, model: common_pb2.ModelRef, request: gateway_pb2.CheckRequest
    ) -> common_pb2.Thresholds:
        if model.version not in self._bundle_thresholds:
            await self._load_bundle_thresholds()
        base = self._bundle_thresholds.get(
            model.version,
            common_pb2.Thresholds(max_hamming=12, min_cosine=0.9, fallback_k=16),
        )
        t = common_pb2.Thresholds()
        t.CopyFrom(base)
        if request.HasField("max_hamming"):
            if request.max_hamming > 64:
                raise errors.InvalidInput(
                    f"max_hamming must be in [0, 64], got {request.max_hamming}"
                )
            t.max_hamming = request.max_hamming
        if request.HasField("min_cosine"):
            if not -1.0 <= request.min_cosine <= 1.0:
                raise errors.InvalidInput(
                    f"min_cosine must be in [-1, 1], got {request.min_cosine}"
                )
            t.min_cosine = request.min_cosine
        if request.HasField("fallback_k"):
            if request.fallback_k > MAX_FALLBACK_K:
                raise errors.InvalidInput(
                    f"fallback_k must be in [0, {MAX_FALLBACK_K}], "
                    f"got {request.fallback_k}"
                )
            t.fallback_k = request.fallback_k
        if request.HasField("background_weight"):
            if not 0.0 <= request.background_weight <= 1.0:
                raise errors.InvalidInput(
                    "background_weight must be in [0, 1], "
                    f"got {request.background_weight}"
                )
            t.background_weight = request.background_weight
        # A caller may ask for the stricter rule, never relax the bundle's.
        t.require_second_key = t.require_second_key or request.require_second_key
        return t

    async def _detect(
        self,
        registry: str,
        model: common_pb2.ModelRef,
        keys: common_pb2.DetectionKeys,
        thresholds: common_pb2.Thresholds,
    ) -> tuple[Decision, int]:
        """Detect on every shard and the global decision; (decision, items searched)."""
        detect = index_pb2.DetectRequest(
            collection=registry,
            model=model,
            query=keys,
            max_hamming=thresholds.max_hamming,
            fallback_k=thresholds.fallback_k,
            max_candidates=self._settings.max_candidates,
        )
        responses = await self._on_shards(registry, lambda s: s.detect(detect))
        decision = decide(
            responses,
            thresholds,
            require_second_key=thresholds.require_second_key,
            background=keys.background,
        )
        return decision, sum(r.searched for r in responses)

    async def Check(
        self, request: gateway_pb2.CheckRequest, context: ServicerContext
    ) -> gateway_pb2.CheckResponse:
        top_n = self._top_n(request.top_n)
        registry = request.registry or self._settings.registry_collection
        free = request.copyright_free or self._settings.copyright_free_collection
        encoding = await self._encoder.encode(request.image, [DETECTION])
        model = encoding.detection_model
        thresholds = await self._thresholds(model, request)
        as_is, searched = await self._detect(
            registry, model, encoding.detection, thresholds
        )
        trimmed, second = None, None
        if as_is.matched is None:
            # One more encode for both what may still match (the trimmed view) and
            # what an UNVERIFIED answer needs (the retrieval code).
            outputs = [RETRIEVAL]
            if thresholds.trimmed_view:
                outputs.append(DETECTION_TRIMMED)
            second = await self._encoder.encode(request.image, outputs)
            if second.HasField("trimmed_detection"):
                trimmed, _ = await self._detect(
                    registry, model, second.trimmed_detection, thresholds
                )
        decision, used_trimmed = with_trimmed_view(as_is, trimmed)
        decided_keys = (
            second.trimmed_detection
            if used_trimmed and second is not None
            else encoding.detection
        )
        if trimmed is not None:
            CHECK_TRIMMED_VIEW.labels("matched" if used_trimmed else "unmatched").inc()
        evidence = gateway_pb2.DetectionEvidence(
            stage=decision.stage,
            stage1_candidates=decision.stage1_count,
            stage2_candidates=decision.stage2_count,
            thresholds=thresholds,
            top_candidates=[
                gateway_pb2.Candidate(id=c.id, hamming=c.hamming, cosine=c.cosine)
                for c in decision.top
            ],
            model=model,
            searched=searched,
            shards=len(self._shards),
            trimmed=used_trimmed,
            background=decided_keys.background,
        )
        reply = gateway_pb2.CheckResponse(
            evidence=evidence, request_id=request_id.get()
        )
        if decision.matched is not None:
            m = decision.matched
            reply.verdict = gateway_pb2.VERDICT_REGISTERED
            reply.match.CopyFrom(
                gateway_pb2.RegisteredMatch(
                    collection=registry,
                    id=m.id,
                    metadata=m.metadata,
                    hamming=m.hamming,
                    cosine=m.cosine,
                )
            )
        else:
            reply.verdict = gateway_pb2.VERDICT_UNVERIFIED
            assert second is not None
            recs = await self._similar(second, free, top_n)
            reply.recommendations.extend(recs)
            reply.retrieval_model.CopyFrom(second.retrieval_model)
        CHECK_VERDICTS.labels(gateway_pb2.Verdict.Name(reply.verdict)).inc()
        return reply

    async def _similar(
        self, encoding: encoder_pb2.Encoding, collection: str, top_n: int
    ) -> list[gateway_pb2.Recommendation]:
        """The top_n of `collection` nearest to the encoding's retrieval code."""
        similar = index_pb2.SimilarRequest(
            collection=collection,
            model=encoding.retrieval_model,
            query=encoding.retrieval,
            top_n=top_n,
        )
        responses = await self._on_shards(collection, lambda s: s.similar(similar))
        recs = [
            gateway_pb2.Recommendation(
                collection=collection,
                id=h.id,
                metadata=h.metadata,
                hamming=h.hamming,
                fine_cosine=h.fine_cosine,
                rank=rank,
            )
            for rank, h in enumerate(merge_similar(responses, top_n), start=1)
        ]
        return recs

    async def Recommend(
        self, request: gateway_pb2.RecommendRequest, context: ServicerContext
    ) -> gateway_pb2.RecommendResponse:
        top_n = self._top_n(request.top_n)
        free = request.copyright_free or self._settings.copyright_free_collection
        encoding = await self._encoder.encode(request.image, [RETRIEVAL])
        recs = await self._similar(encoding, free, top_n)
        return gateway_pb2.RecommendResponse(
            recommendations=recs,
            retrieval_model=encoding.retrieval_model,
            request_id=request_id.get(),
        )

    # ---- Register ------------------------------------------------------------------

    async def Register(
        self,
        request_iterator: AsyncIterator[gateway_pb2.RegisterRequest],
        context: ServicerContext,
    ) -> gateway_pb2.RegisterResponse:
        reply = gateway_pb2.RegisterResponse()
        collection, kind = "", common_pb2.COLLECTION_KIND_UNSPECIFIED
        batch: list[gateway_pb2.RegisterRequest] = []
        received = 0
        async for message in request_iterator:
            received += 1
            if not collection:
                if not message.collection:
                    raise errors.InvalidInput(
                        "the first Register message must name the collection"
                    )
                if message.kind == common_pb2.COLLECTION_KIND_UNSPECIFIED:
                    raise errors.InvalidInput(
                        "the first Register message must set kind "
                        "(COLLECTION_KIND_REGISTRY or COLLECTION_KIND_COPYRIGHT_FREE)"
                    )
                collection, kind = message.collection, message.kind
                reply.collection = collection
            elif message.collection and message.collection != collection:
                raise errors.InvalidInput(
                    "one Register stream writes one collection: "
                    f"got {message.collection!r}"
                    f" after {collection!r}"
                )
            elif message.kind and message.kind != kind:
                raise errors.InvalidInput("kind changed within a Register stream")
            batch.append(message)
            if len(batch) >= self._settings.register_batch:
                await self._register_batch(collection, kind, batch, reply)
                batch = []
        if received == 0:
            raise errors.InvalidInput("Register stream carried no messages")
        if batch:
            await self._register_batch(collection, kind, batch, reply)
        return reply

    async def _register_batch(
        self,
        collection: str,
        kind: int,
        batch: list[gateway_pb2.RegisterRequest],
        reply: gateway_pb2.RegisterResponse,
    ) -> None:
        valid = []
        for m in batch:
            if not 1 <= len(m.id) <= MAX_ID_CHARS:
                reply.failures.add(
                    id=m.id[:MAX_ID_CHARS],
                    code="INVALID_ARGUMENT",
                    message=f"id must be 1..{MAX_ID_CHARS} characters, got {len(m.id)}",
                )
            else:
                valid.append(m)
        if not valid:
            return
        registry = kind == common_pb2.COLLECTION_KIND_REGISTRY
        results = await self._encoder.encode_batch(
            [m.image for m in valid], [DETECTION if registry else RETRIEVAL]
        )
        per_shard: dict[int, list[index_pb2.IndexItem]] = {}
        model = common_pb2.ModelRef()
        for m, result in zip(valid, results, strict=True):
            if result.HasField("error"):
                reply.failures.add(
                    id=m.id, code=result.error.code, message=result.error.message
                )
                continue
            enc = result.encoding
            item = index_pb2.IndexItem(id=m.id, metadata=m.metadata)
            if registry:
                item.keys.CopyFrom(enc.detection)
                model = enc.detection_model
            else:
                item.code.CopyFrom(enc.retrieval)
                model = enc.retrieval_model
            per_shard.setdefault(shard_for(m.id, len(self._shards)), []).append(item)
        if not per_shard:
            return
        replies = await asyncio.gather(
            *(
                self._shards[shard].upsert(
                    index_pb2.UpsertRequest(
                        collection=collection,
                        kind=kind,
                        model=model,
                        items=items,  # type: ignore[arg-type]
                    )
                )
                for shard, items in sorted(per_shard.items())
            )
        )
        reply.registered += sum(r.upserted for r in replies)
        reply.replaced += sum(r.replaced for r in replies)
        reply.model.CopyFrom(model)

    # ---- Delete / Stats / ModelInfo -----------------------------------------------

    async def Delete(
        self, request: gateway_pb2.GatewayDeleteRequest, context: ServicerContext
    ) -> gateway_pb2.GatewayDeleteResponse:
        if not request.collection:
            raise errors.InvalidInput("collection must be set")
        by_shard: dict[int, list[str]] = {}
        for item_id in request.ids:
            by_shard.setdefault(shard_for(item_id, len(self._shards)), []).append(
                item_id
            )
        reply = gateway_pb2.GatewayDeleteResponse()
        shards = [self._shards[i] for i in sorted(by_shard)]

        async def delete_on(shard: IndexClient) -> tuple[int, index_pb2.DeleteResponse]:
            ids = by_shard[shard.shard_id]
            try:
                r = await shard.delete(
                    index_pb2.DeleteRequest(collection=request.collection, ids=ids)
                )
            except errors.NotFound:
                r = index_pb2.DeleteResponse(missing_ids=ids)
            return shard.shard_id, r

        for _, r in await self._on_shards(request.collection, delete_on, shards):
            reply.deleted += r.deleted
            reply.missing_ids.extend(r.missing_ids)
        return reply

    async def Stats(
        self, request: gateway_pb2.GatewayStatsRequest, context: ServicerContext
    ) -> gateway_pb2.GatewayStatsResponse:
        replies = await asyncio.gather(*(s.stats() for s in self._shards))
        return gateway_pb2.GatewayStatsResponse(shards=replies)

    async def ModelInfo(
        self, request: encoder_pb2.ModelInfoRequest, context: ServicerContext
    ) -> encoder_pb2.ModelInfoResponse:
        return await self._encoder.model_info()


def as_service(servicer: GatewayServicer) -> Service:
    return Service(
        GATEWAY_SERVICE_NAME,
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server,
        servicer,
    )
