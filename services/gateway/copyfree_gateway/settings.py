"""Gateway settings (GATEWAY_* environment variables)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from copyfree.serving.settings import ServiceSettings


class GatewaySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_", frozen=True)

    port: int = Field(50050, ge=0, le=65535)
    encoder_addr: str = "127.0.0.1:50051"
    # One address per shard, in shard order: index_addrs[i] serves shard i.
    # From the environment as JSON: GATEWAY_INDEX_ADDRS='["index-0.index:50061"]'.
    index_addrs: list[str] = Field(
        default_factory=lambda: ["127.0.0.1:50061"], min_length=1
    )
    registry_collection: str = "registry"
    copyright_free_collection: str = "copyright-free"
    call_timeout_s: float = Field(30.0, gt=0)
    default_top_n: int = Field(10, ge=1, le=100)
    max_candidates: int = Field(100, ge=1, le=1000)  # per shard, stage-2 candidates
    register_batch: int = Field(32, ge=1, le=256)  # images per encoder/index round trip
