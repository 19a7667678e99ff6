"""Gateway settings (GATEWAY_* environment variables)."""

from __future__ import annotations

from pathlib import Path
from typing import Self

from pydantic import Field, SecretStr, model_validator
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

    # ---- Audit log of every Check (Redis stream; "" = audit off) ---------------
    redis_url: str = ""
    audit_key: str = "copyfree:v1:audit:check"
    # Approximate cap on entries kept (XADD MAXLEN ~); older ones are trimmed.
    audit_max_entries: int = Field(1_000_000, ge=1000)
    # False: a Check whose audit record cannot be written fails (UNAVAILABLE), so every
    # answered Check is on record. True: answer anyway, count and log the failure.
    audit_fail_open: bool = False

    # ---- How the gateway calls encoder and index -----------------------------
    # Its own bearer token (needs scopes check, register, admin on those services).
    upstream_token_file: Path | None = None
    upstream_token: SecretStr | None = None
    # TLS to encoder and index when set: CA that their certificates chain to; with
    # cert + key the gateway presents a client certificate (mutual TLS).
    upstream_ca_file: Path | None = None
    upstream_cert_file: Path | None = None
    upstream_key_file: Path | None = None
    # Name the upstream certificates carry when it differs from the address's host.
    upstream_server_name: str = ""

    @model_validator(mode="after")
    def _upstream_tls(self) -> Self:
        if (self.upstream_cert_file is None) != (self.upstream_key_file is None):
            raise ValueError("set both upstream_cert_file and upstream_key_file")
        if self.upstream_cert_file is not None and self.upstream_ca_file is None:
            raise ValueError("a client certificate needs upstream_ca_file (TLS)")
        if self.upstream_token_file is not None and self.upstream_token is not None:
            raise ValueError("set upstream_token_file or upstream_token, not both")
        return self

    def upstream_bearer(self) -> str | None:
        """The token the gateway sends to encoder and index (None = none)."""
        if self.upstream_token is not None:
            return self.upstream_token.get_secret_value().strip()
        if self.upstream_token_file is not None:
            return self.upstream_token_file.read_text().strip()
        return None
