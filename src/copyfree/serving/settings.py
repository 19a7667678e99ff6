"""Settings every service reads from its environment (subclasses set the prefix).

Security is off by default (plaintext, no tokens) so a laptop stack and the tests need
no certificates; Kubernetes overlays turn it on. See docs in deploy/k8s/README.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(frozen=True)

    host: str = "[::]"
    port: int = Field(50051, ge=0, le=65535)  # 0 = ephemeral (tests)
    metrics_port: int = Field(0, ge=0, le=65535)  # 0 = no metrics endpoint
    # Plaintext port that serves only gRPC health (kubelet gRPC probes cannot speak
    # TLS). 0 = none: health is on `port` with everything else.
    health_port: int = Field(0, ge=0, le=65535)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # One JSON line per RPC (method, code, duration, client) at INFO; off = DEBUG only.
    access_log: bool = False
    shutdown_grace_s: float = Field(5.0, gt=0)
    # gRPC's own default receive limit is 4 MiB; images can be larger. Larger
    # messages are refused by gRPC itself with RESOURCE_EXHAUSTED.
    max_message_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    # Server-wide cap on RPCs in flight (gRPC answers RESOURCE_EXHAUSTED); 0 = none.
    max_concurrent_rpcs: int = Field(0, ge=0)

    # ---- TLS (certificates from files; all three set = mutual TLS) -----------------
    tls_cert_file: Path | None = None  # PEM server certificate (chain)
    tls_key_file: Path | None = None  # PEM private key of tls_cert_file
    # CA that client certificates must chain to; set = clients must present one.
    tls_client_ca_file: Path | None = None

    # ---- Bearer tokens ---------------------------------------------------------------
    # JSON object token -> {"client": name, "scopes": [...], optional limits}, from a
    # file (a mounted Secret) and/or the environment. Neither set = auth off.
    auth_tokens_file: Path | None = None
    auth_tokens: SecretStr | None = None

    # ---- Per-client limits (client = token's client name, else the peer address) ----
    client_max_in_flight: int = Field(0, ge=0)  # concurrent RPCs; 0 = unlimited
    client_rate_per_s: float = Field(0.0, ge=0)  # sustained RPCs/s; 0 = unlimited
    client_burst: int = Field(0, ge=0)  # token-bucket size; 0 = max(1, rate)

    @model_validator(mode="after")
    def _tls_pairs(self) -> Self:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("set both tls_cert_file and tls_key_file, or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file")
        return self

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert_file is not None

    @property
    def auth_enabled(self) -> bool:
        return self.auth_tokens_file is not None or self.auth_tokens is not None
