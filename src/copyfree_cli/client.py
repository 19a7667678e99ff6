"""Synchronous gateway calls for the command line: register a folder, check an image."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
from tqdm import tqdm

from copyfree.folders import ImageRecord
from copyfree.serving.server import channel_options
from copyfree.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

KINDS = {
    "registry": common_pb2.COLLECTION_KIND_REGISTRY,
    "copyright-free": common_pb2.COLLECTION_KIND_COPYRIGHT_FREE,
}
MAX_MESSAGE_BYTES = 32 * 1024 * 1024


def gateway_stub(address: str) -> gateway_pb2_grpc.GatewayServiceStub:
    channel = grpc.insecure_channel(address, options=channel_options(MAX_MESSAGE_BYTES))
    return gateway_pb2_grpc.GatewayServiceStub(channel)


def metadata_of(record: ImageRecord) -> common_pb2.WorkMetadata:
    """Title/owner/licence/source from the folder's manifest row where it has them."""
    info = record.info
    return common_pb2.WorkMetadata(
        title=info.get("title") or record.item_id,
        owner=info.get("owner", ""),
        licence=info.get("licence") or info.get("license", ""),
        source=info.get("source") or info.get("source_package") or record.path.name,
    )


def register_records(
    stub: gateway_pb2_grpc.GatewayServiceStub,
    records: Sequence[ImageRecord],
    collection: str,
    kind: str,
    *,
    progress: bool = True,
    timeout_s: float = 3600.0,
) -> gateway_pb2.RegisterResponse:
    """Stream the images to Register with a progress bar (images sent)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")

    def messages() -> Iterator[gateway_pb2.RegisterRequest]:
        bar = tqdm(
            records, desc=f"register -> {collection}", unit="img", disable=not progress
        )
        for r in bar:
            yield gateway_pb2.RegisterRequest(
                collection=collection,
                kind=KINDS[kind],
                id=r.item_id,
                image=Path(r.path).read_bytes(),
                metadata=metadata_of(r),
            )

    reply: gateway_pb2.RegisterResponse = stub.Register(messages(), timeout=timeout_s)
    return reply


def check_image(
    stub: gateway_pb2_grpc.GatewayServiceStub,
    image: bytes,
    *,
    top_n: int = 5,
    timeout_s: float = 60.0,
) -> gateway_pb2.CheckResponse:
    reply: gateway_pb2.CheckResponse = stub.Check(
        gateway_pb2.CheckRequest(image=image, top_n=top_n), timeout=timeout_s
    )
    return reply
