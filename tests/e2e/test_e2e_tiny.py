"""End to end with tiny onnx.helper bundles (no torch): encoder, 2 index shards,
gateway and Redis as real processes on loopback ports."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.stack_checks import run_scenario
from tests.utils.tiny_bundles import make_detection_bundle, make_retrieval_bundle

pytestmark = pytest.mark.e2e


def test_detect_then_recommend_with_tiny_bundles(tmp_path: Path) -> None:
    detection = make_detection_bundle(tmp_path / "detect")
    retrieval = make_retrieval_bundle(tmp_path / "retrieve", bits=16)
    run_scenario(tmp_path, detection, retrieval)
