"""Prometheus metrics shared by the services, and the optional /metrics endpoint."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RPC_SECONDS = Histogram(
    "copyfree_rpc_duration_seconds",
    "Server-side RPC latency by method and status code",
    ["method", "code"],
    buckets=(
        0.0005,
        0.001,
        0.0025,
        0.005,
        0.01,
        0.025,
        0.05,
        0.1,
        0.25,
        0.5,
        1,
        2.5,
        5,
    ),
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
MODEL_INFO = Gauge(
    "copyfree_model_info", "Loaded model bundles (value 1)", ["kind", "name", "version"]
)
CHECK_VERDICTS = Counter("copyfree_check_verdicts_total", "Check verdicts", ["verdict"])


def start_metrics_server(port: int) -> None:
    """Serve /metrics on port (0 = disabled)."""
    if port:
        start_http_server(port)
