"""EncoderSettings: the encoder configuration, from ENCODER_* environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from copyfree.preprocess import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_PIXELS
from copyfree.serving.settings import ServiceSettings

Providers = Literal["auto", "cpu", "cuda"]


class EncoderSettings(ServiceSettings):
    """Environment: ENCODER_<FIELD>, e.g. ENCODER_DETECTION_BUNDLE=/models/detection."""

    model_config = SettingsConfigDict(env_prefix="ENCODER_")

    port: int = Field(default=50051, ge=0, le=65535)  # 0 = ephemeral (tests)
    # Bundle folders (model.onnx + manifest.json). At least one; both for the gateway.
    detection_bundle: Path | None = None
    retrieval_bundle: Path | None = None
    # Decoding limits, checked before any pixel is decoded.
    max_image_bytes: int = Field(default=DEFAULT_MAX_IMAGE_BYTES, ge=1)
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, ge=1)
    # Micro-batching: concurrent requests arriving within batch_wait_ms of the first
    # one share one model run of at most max_batch images. EncodeBatch accepts up to
    # max_batch * BATCH_REQUEST_FACTOR images per request.
    max_batch: int = Field(default=32, ge=1, le=1024)
    batch_wait_ms: float = Field(default=2.0, ge=0, le=1000)
    # ONNX Runtime: intra-op threads per session (0 = ORT's default, one per core);
    # execution providers: auto = CUDA when onnxruntime reports it, else CPU.
    intra_op_threads: int = Field(default=0, ge=0)
    providers: Providers = "auto"

    @model_validator(mode="after")
    def _one_bundle_at_least(self) -> Self:
        if self.detection_bundle is None and self.retrieval_bundle is None:
            raise ValueError(
                "set ENCODER_DETECTION_BUNDLE and/or ENCODER_RETRIEVAL_BUNDLE "
                "(a folder with model.onnx + manifest.json)"
            )
        return self
