"""Settings every service reads from its environment (subclasses set the prefix)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(frozen=True)

    host: str = "[::]"
    port: int = Field(50051, ge=0, le=65535)  # 0 = ephemeral (tests)
    metrics_port: int = Field(0, ge=0, le=65535)  # 0 = no metrics endpoint
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    shutdown_grace_s: float = Field(5.0, gt=0)
    # gRPC's own default receive limit is 4 MiB; images can be larger.
    max_message_bytes: int = Field(32 * 1024 * 1024, ge=1024)
