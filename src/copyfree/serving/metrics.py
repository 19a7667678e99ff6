"""Prometheus metrics shared by the services, and the optional /metrics endpoint."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
)  # fmt: skip
RPC_SECONDS = Histogram(
    "copyfree_rpc_duration_seconds",
    "Server-side RPC latency by method and status code",
    ["method", "code"],
    buckets=LATENCY_BUCKETS,
)
ENCODER_BATCH_SIZE = Histogram(
    "copyfree_encoder_batch_size",
    "Images per model run",
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
INDEX_ITEMS = Gauge(
    "copyfree_index_items",
    "Live items per shard and collection",
    ["shard", "collection"],
)
INDEX_COLLECTION_MODEL = Gauge(
    "copyfree_index_collection_model_info",
    "Model version whose keys a collection holds, per shard (value 1)",
    ["shard", "collection", "name", "version"],
)
MODEL_INFO = Gauge(
    "copyfree_model_info", "Loaded model bundles (value 1)", ["kind", "name", "version"]
)
CHECK_VERDICTS = Counter("copyfree_check_verdicts_total", "Check verdicts", ["verdict"])
CHECK_TRIMMED_VIEW = Counter(
    "copyfree_check_trimmed_view_total",
    "Checks that searched the border-trimmed view (the image as is matched nothing)",
    ["outcome"],  # matched, unmatched
)
RPC_REJECTED = Counter(
    "copyfree_rpc_rejected_total",
    "Calls refused before the handler ran, by reason",
    ["reason"],  # unauthenticated, permission_denied, in_flight, rate
)
RPC_IN_FLIGHT = Gauge(
    "copyfree_rpc_in_flight", "RPCs being served now, by method", ["method"]
)
UPSTREAM_SECONDS = Histogram(
    "copyfree_upstream_duration_seconds",
    "Client-side latency of the gateway's calls to encoder and index, by status",
    ["target", "method", "code"],
    buckets=LATENCY_BUCKETS,  # the server's buckets: the two compare 1:1
)
AUDIT_WRITES = Counter(
    "copyfree_audit_writes_total", "Audit records written, by outcome", ["outcome"]
)


def start_metrics_server(port: int) -> None:
    """Serve /metrics on port (0 = disabled), in a daemon thread."""
    if port:
        start_http_server(port)
