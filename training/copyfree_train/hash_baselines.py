"""Non-learned and shallow hashing baselines for the retrieval evaluation.

Owns: sign-of-random-projection LSH (SimHash), PCA-sign hashing and ITQ (Gong &
Lazebnik, "Iterative quantization", CVPR 2011) on backbone features, and pHash
(PyPI `imagehash`) on the images themselves, with a disk cache for the latter.

Every learned baseline is fitted on the database features only (the training set of the
split), never on queries. Bits are returned as {0,1} uint8 arrays (n, B), the layout the
ranking code in copyfree_train.train_retrieve takes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from copyfree_train.backbone import records_hash
from copyfree_train.data import ImageRecord, load_rgb


@dataclass(frozen=True)
class LinearHash:
    """bits = (x - mean) @ projection > 0."""

    mean: np.ndarray  # (D,)
    projection: np.ndarray  # (D, B)

    def __call__(self, features: np.ndarray) -> np.ndarray:
        x = np.asarray(features, dtype=np.float64) - self.mean
        return (x @ self.projection > 0).astype(np.uint8)


def fit_lsh(train: np.ndarray, bits: int, seed: int) -> LinearHash:
    """SimHash: Gaussian random hyperplanes through the training mean."""
    rng = np.random.default_rng(seed)
    planes = rng.standard_normal((train.shape[1], bits))
    return LinearHash(train.mean(axis=0).astype(np.float64), planes)


def _pca(train: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
    mean = train.mean(axis=0).astype(np.float64)
    # More dimensions than training items (tiny sets): the full basis pads the
    # principal directions with arbitrary orthonormal ones.
    full = dims > min(train.shape)
    _, _, vt = np.linalg.svd(train - mean, full_matrices=full)
    return mean, vt[:dims].T


def fit_pca_sign(train: np.ndarray, bits: int) -> LinearHash:
    """Sign of the top-`bits` principal components."""
    mean, proj = _pca(train, bits)
    return LinearHash(mean, proj)


def fit_itq(
    train: np.ndarray, bits: int, seed: int = 0, iterations: int = 50
) -> LinearHash:
    """ITQ: PCA to `bits` dimensions, then the orthogonal rotation R minimising the
    quantisation error ||B - V R||, alternating B = sign(V R) and an orthogonal
    Procrustes step for R (the paper's 50 iterations)."""
    mean, proj = _pca(train, bits)
    v = (train - mean) @ proj
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.standard_normal((bits, bits)))
    for _ in range(iterations):
        b = np.where(v @ rotation >= 0, 1.0, -1.0)
        u, _, wt = np.linalg.svd(b.T @ v)
        rotation = (u @ wt).T
    return LinearHash(mean, proj @ rotation)


# --------------------------------------------------------------------------------------
# pHash


PHASH_SIZES = {16: 4, 64: 8}  # bits -> imagehash hash_size (bits = hash_size ** 2)


def phash_bits(image_path: Path, bits: int) -> np.ndarray:
    """imagehash.phash of one image as {0,1} (bits,), bits in 16, 32, 64.

    16 and 64 are imagehash's own hash sizes 4 and 8; 32 keeps the first 32 bits of the
    64-bit hash (the lowest-frequency half of its 8x8 DCT block, row-major), since
    pHash has no 32-bit form.
    """
    import imagehash

    size = PHASH_SIZES.get(bits, 8)
    h = imagehash.phash(load_rgb(image_path), hash_size=size)
    return np.asarray(h.hash, dtype=np.uint8).reshape(-1)[:bits]


def phash_codes(
    records: Sequence[ImageRecord],
    bits: int,
    cache_dir: Path,
    *,
    progress: bool = True,
) -> np.ndarray:
    """(len(records), bits) pHash bits, cached as .npy by (bits, file list, version)."""
    import imagehash

    if bits not in (16, 32, 64):
        raise ValueError(f"pHash bits must be 16, 32 or 64, got {bits}")
    source_bits = 16 if bits == 16 else 64
    key = hashlib.blake2b(
        f"phash|{imagehash.__version__}|{source_bits}".encode(), digest_size=6
    ).hexdigest()
    path = Path(cache_dir) / f"phash{source_bits}-{key}-{records_hash(records)}.npy"
    if path.is_file():
        codes = np.load(path)
    else:
        codes = np.stack(
            [
                phash_bits(r.path, source_bits)
                for r in tqdm(
                    records,
                    desc=f"pHash{source_bits}",
                    unit="img",
                    disable=not progress,
                )
            ]
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, codes)
        tmp.replace(path)
    return codes[:, :bits]
