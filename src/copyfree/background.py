"""Background similarity of a detection query: how close its second key already is to
ordinary images that are not registered (the bundle's background bank).

Why: the look-alikes that set the cosine threshold (cards of one deck, one flag beside
another) are queries that resemble many images, registered or not, while a copy of a
distinctive work resembles only its original. Subtracting a share of the query's
similarity to a fixed bank of unrelated images ("similarity normalisation", as in the
DISC21 copy-detection baselines) lowers the look-alikes' scores more than the copies':

    score = cosine(query, candidate) - background_weight * background(query)

where background(query) is the mean cosine of the query's second key to its `top_k`
nearest bank keys. The decision (copyfree_gateway.decision) compares score, not the
raw cosine, with min_cosine; background_weight = 0 is the seed's rule.

A bundle's bank is `background.npy` (int16 second keys of that bundle's model, one row
per bank image) described by the manifest's "background" entry; the encoder computes
background(query) next to the keys, so the index is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from copyfree.bundle import Manifest, read_manifest, write_manifest

BANK_FILE = "background.npy"
MANIFEST_KEY = "background"  # manifest entry: {"file", "top_k", "images", ...}
DEFAULT_TOP_K = 3


def unit_rows(second_keys: NDArray[Any]) -> NDArray[np.float32]:
    """Second keys (n, 64) int16 as float32 rows of unit length (the cosine's space)."""
    k = np.asarray(second_keys, np.float32).reshape(len(second_keys), -1)
    return k / np.maximum(np.linalg.norm(k, axis=1, keepdims=True), 1e-9)


@dataclass(frozen=True)
class BackgroundBank:
    keys: NDArray[np.float32]  # (n, 64), unit rows
    top_k: int

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= len(self.keys):
            raise ValueError(
                f"background top_k must be in [1, {len(self.keys)}], got {self.top_k}"
            )

    @classmethod
    def of(
        cls, second_keys: NDArray[Any], top_k: int = DEFAULT_TOP_K
    ) -> BackgroundBank:
        return cls(unit_rows(second_keys), top_k)

    @classmethod
    def load(cls, bundle_dir: Path, manifest: Manifest) -> BackgroundBank | None:
        """The bundle's bank, or None when its manifest names none."""
        entry = manifest.extra.get(MANIFEST_KEY)
        if not entry:
            return None
        path = Path(bundle_dir) / str(entry.get("file", BANK_FILE))
        keys = np.load(path, allow_pickle=False)
        if keys.ndim != 2 or keys.dtype != np.int16:
            raise ValueError(f"{path}: want (n, 64) int16 second keys, got "
                             f"{keys.shape} {keys.dtype}")  # fmt: skip
        return cls.of(keys, int(entry.get("top_k", DEFAULT_TOP_K)))

    def similarity(self, second_keys: NDArray[Any]) -> NDArray[np.float32]:
        """background(query) for each row of `second_keys` (m, 64): the mean cosine to
        its top_k nearest bank keys."""
        if len(second_keys) == 0:
            return np.zeros(0, np.float32)
        cos = unit_rows(second_keys) @ self.keys.T
        nearest = np.partition(cos, len(self.keys) - self.top_k, axis=1)
        return nearest[:, -self.top_k :].mean(axis=1).astype(np.float32)


def write_bank(
    bundle_dir: Path, second_keys: NDArray[Any], top_k: int, provenance: dict[str, Any]
) -> Manifest:
    """Write background.npy into the bundle and name it in the manifest (version kept:
    the bank changes no key). Returns the new manifest."""
    keys = np.ascontiguousarray(second_keys, dtype=np.int16)
    BackgroundBank.of(keys, top_k)  # refuse a bank that would not load
    bundle_dir = Path(bundle_dir)
    tmp = bundle_dir / (BANK_FILE + ".tmp.npy")
    np.save(tmp, keys, allow_pickle=False)
    tmp.replace(bundle_dir / BANK_FILE)
    manifest = read_manifest(bundle_dir)
    entry = {"file": BANK_FILE, "top_k": top_k, "images": len(keys), **provenance}
    manifest = replace(manifest, extra={**manifest.extra, MANIFEST_KEY: entry})
    write_manifest(bundle_dir, manifest)
    return manifest
