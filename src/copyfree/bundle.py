"""Model bundle contract: a folder with model.onnx + manifest.json, written by training,
loaded by the encoder. The manifest carries everything needed to use the model the way
it was trained: preprocessing, output names, bits, thresholds, theta, provenance."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from copyfree.preprocess import PreprocessSpec

MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
FORMAT_VERSION = 1
INPUT_NAME = "images"  # (batch, channels, size, size) float32, from copyfree.preprocess

# Output names per kind. Detection: embedding (n,64) float32, first_key (n,8)
# uint8 packed MSB-first, second_key (n,64) int16. Retrieval: code (n,B/8) uint8 packed
# MSB-first, fine (n,F) int8 (orders ties in Hamming distance; higher cosine = closer).
DETECTION_OUTPUTS = ("embedding", "first_key", "second_key")
RETRIEVAL_OUTPUTS = ("code", "fine")

Kind = Literal["detection", "retrieval"]


@dataclass(frozen=True)
class Thresholds:
    """Detection thresholds (DESIGN.md §3); seed defaults until calibrated."""

    max_hamming: int = 12
    min_cosine: float = 0.9
    fallback_k: int = 16
    # False = the paper rule: a unique stage-1 candidate is the answer without T2.
    require_second_key: bool = False
    # Search again with the image's uniform border trimmed when the image as is matches
    # nothing. Off until a calibration that measured it turns it on.
    trimmed_view: bool = False
    # Stage 2 compares cosine - background_weight * the query's background similarity
    # (copyfree.background) with min_cosine; 0 (the seed's rule) until calibrated.
    background_weight: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The manifest's "thresholds"; the keys are common.proto Thresholds fields."""
        return {
            "max_hamming": self.max_hamming,
            "min_cosine": self.min_cosine,
            "fallback_k": self.fallback_k,
            "require_second_key": self.require_second_key,
            "trimmed_view": self.trimmed_view,
            "background_weight": self.background_weight,
        }


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    kind: Kind
    preprocess: PreprocessSpec
    code_bits: int
    fine_dim: int = 0
    thresholds: Thresholds = field(default_factory=Thresholds)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "version": self.version,
            "kind": self.kind,
            "input": INPUT_NAME,
            "outputs": list(
                DETECTION_OUTPUTS if self.kind == "detection" else RETRIEVAL_OUTPUTS
            ),
            "preprocess": self.preprocess.to_dict(),
            "code_bits": self.code_bits,
            "fine_dim": self.fine_dim,
            "thresholds": self.thresholds.to_dict(),
            **self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        known = {
            "format_version", "name", "version", "kind", "input", "outputs",
            "preprocess", "code_bits", "fine_dim", "thresholds",
        }  # fmt: skip
        if d.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"manifest format_version {d.get('format_version')!r} is not "
                f"{FORMAT_VERSION}"
            )
        if d["kind"] not in ("detection", "retrieval"):
            raise ValueError(
                f"manifest kind must be detection or retrieval: {d['kind']}"
            )
        t = d.get("thresholds", {})
        return cls(
            name=str(d["name"]),
            version=str(d["version"]),
            kind=d["kind"],
            preprocess=PreprocessSpec.from_dict(d["preprocess"]),
            code_bits=int(d["code_bits"]),
            fine_dim=int(d.get("fine_dim", 0)),
            thresholds=Thresholds(
                max_hamming=int(t.get("max_hamming", 12)),
                min_cosine=float(t.get("min_cosine", 0.9)),
                fallback_k=int(t.get("fallback_k", 16)),
                require_second_key=bool(t.get("require_second_key", False)),
                trimmed_view=bool(t.get("trimmed_view", False)),
                background_weight=float(t.get("background_weight", 0.0)),
            ),
            extra={k: v for k, v in d.items() if k not in known},
        )


def read_manifest(bundle_dir: Path) -> Manifest:
    path = Path(bundle_dir) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST_FILE} in bundle {bundle_dir}")
    return Manifest.from_dict(json.loads(path.read_text()))


def write_manifest(bundle_dir: Path, manifest: Manifest) -> Path:
    """Write manifest.json atomically: a running encoder may read it at any moment,
    and a manifest that would not load is never installed."""
    path = Path(bundle_dir) / MANIFEST_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(manifest.to_dict(), indent=2, sort_keys=False) + "\n"
    Manifest.from_dict(json.loads(text))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path
