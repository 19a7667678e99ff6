"""Import boundaries (STYLE.md §3.2): a stray import fails here, not in an image."""

from __future__ import annotations

import subprocess
import sys

import pytest

CASES = [
    ("copyfree.preprocess, copyfree.codes, copyfree.hamming, copyfree.serving.server",
     ["torch", "onnxruntime", "redis"]),
    ("copyfree_gateway.servicer", ["torch", "onnxruntime", "redis"]),
    ("copyfree_encoder.servicer", ["torch", "redis"]),
    ("copyfree_index.servicer", ["torch", "onnxruntime"]),
    ("copyfree_cli.__main__", ["torch", "onnxruntime"]),
]  # fmt: skip


@pytest.mark.parametrize(("modules", "forbidden"), CASES)
def test_module_does_not_import(modules: str, forbidden: list[str]) -> None:
    code = (
        f"import sys, {modules}\n"
        f"bad = [m for m in {forbidden!r} if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
