"""Synchronous gateway calls for the command line: register a folder, check an image."""

from __future__ import annotations

import collections
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from tqdm import tqdm

from copyfree.folders import ImageRecord
from copyfree.serving.server import channel_options
from copyfree.serving.tls import channel_credentials
from copyfree.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

KINDS = {
    "registry": common_pb2.COLLECTION_KIND_REGISTRY,
    "copyright-free": common_pb2.COLLECTION_KIND_COPYRIGHT_FREE,
}
MAX_MESSAGE_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class Connection:
    """How the command line reaches the gateway: plaintext by default; TLS when a CA
    (or a client certificate) is given; a bearer token on every call when set."""

    address: str
    token: str | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str = ""

    @property
    def tls(self) -> bool:
        return self.ca_file is not None or self.cert_file is not None


class _CallDetails(
    collections.namedtuple(
        "_CallDetails",
        (
            "method",
            "timeout",
            "metadata",
            "credentials",
            "wait_for_ready",
            "compression",
        ),
    ),
    grpc.ClientCallDetails,
):
    pass


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.StreamUnaryClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call (unary and streaming)."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(
            details.method,
            details.timeout,
            [*(details.metadata or ()), self._header],
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):  # type: ignore[no-untyped-def]
        return continuation(self._with_token(details), request_iterator)


def gateway_stub(target: str | Connection) -> gateway_pb2_grpc.GatewayServiceStub:
    conn = target if isinstance(target, Connection) else Connection(target)
    options = channel_options(MAX_MESSAGE_BYTES)
    if conn.server_name:
        options = [*options, ("grpc.ssl_target_name_override", conn.server_name)]
    if conn.tls:
        creds = channel_credentials(conn.ca_file, conn.cert_file, conn.key_file)
        channel = grpc.secure_channel(conn.address, creds, options=options)
    else:
        channel = grpc.insecure_channel(conn.address, options=options)
    if conn.token:
        channel = grpc.intercept_channel(channel, _BearerToken(conn.token))
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
