"""Entry point: `python -m copyfree_encoder`, configured by ENCODER_* variables."""

from __future__ import annotations

import asyncio
import logging
import sys

from pydantic import ValidationError

from copyfree.serving.logging import configure_logging
from copyfree_encoder.app import EncoderApp, serve
from copyfree_encoder.model import BundleError
from copyfree_encoder.settings import EncoderSettings

log = logging.getLogger("copyfree_encoder")


def main() -> None:
    try:
        settings = EncoderSettings()  # env -> validated, frozen; bad config fails here
    except ValidationError as e:
        configure_logging("INFO", service="encoder")
        log.error("invalid encoder configuration: %s", e)
        sys.exit(2)
    configure_logging(settings.log_level, service="encoder")
    try:
        asyncio.run(serve(settings))
    except BundleError as e:
        log.error("cannot serve the model bundles: %s", e)
        sys.exit(1)


__all__ = ["EncoderApp", "main", "serve"]

if __name__ == "__main__":
    main()
