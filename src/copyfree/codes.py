"""Key and code formats shared by training, encoder, index and evaluation.

Detection (DESIGN.md §3): first key = 64 bits, bit i = z_i > theta_i, packed MSB-first
(numpy.packbits order, i.e. big-endian bytes); second key = round(1000 * z) as int16
with saturation. Retrieval: B-bit codes packed the same way, plus an int8 "fine" vector
used only to order ties in Hamming distance.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from copyfree.errors import InvalidInput

FIRST_KEY_BITS = 64
EMBEDDING_DIM = 64
SECOND_KEY_SCALE = 1000.0
INT16_MIN, INT16_MAX = -32768, 32767
SUPPORTED_CODE_BITS = tuple(range(8, 257, 8))


def pack_bits(bits: NDArray[np.bool_] | NDArray[np.uint8]) -> NDArray[np.uint8]:
    """(..., B) of 0/1 -> (..., B/8) uint8, MSB-first. B must be a multiple of 8."""
    bits = np.asarray(bits)
    if bits.shape[-1] % 8:
        raise InvalidInput(f"bit count must be a multiple of 8, got {bits.shape[-1]}")
    return np.packbits(bits.astype(bool), axis=-1)


def unpack_bits(packed: NDArray[np.uint8], num_bits: int) -> NDArray[np.uint8]:
    """(..., B/8) uint8 -> (..., B) of 0/1."""
    return np.unpackbits(np.asarray(packed, dtype=np.uint8), axis=-1, count=num_bits)


def first_key(
    embedding: NDArray[np.floating], theta: NDArray[np.floating]
) -> NDArray[np.uint8]:
    """(..., 64) embedding, (64,) theta -> (..., 8) packed first key."""
    return pack_bits(np.asarray(embedding) > np.asarray(theta))


def second_key(embedding: NDArray[np.floating]) -> NDArray[np.int16]:
    """(..., 64) embedding -> (..., 64) int16 = round(1000 z), saturated."""
    scaled = np.rint(np.asarray(embedding, dtype=np.float64) * SECOND_KEY_SCALE)
    return np.clip(scaled, INT16_MIN, INT16_MAX).astype(np.int16)


def check_packed(packed: bytes, num_bits: int, what: str) -> NDArray[np.uint8]:
    """Validate a packed code from the wire; returns it as (B/8,) uint8."""
    want = num_bits // 8
    if len(packed) != want:
        raise InvalidInput(
            f"{what} must be {want} bytes ({num_bits} bits), got {len(packed)} bytes"
        )
    return np.frombuffer(packed, dtype=np.uint8).copy()


def second_key_from_bytes(data: bytes) -> NDArray[np.int16]:
    """Wire form (64 little-endian int16 = 128 bytes) -> (64,) int16."""
    want = EMBEDDING_DIM * 2
    if len(data) != want:
        raise InvalidInput(
            f"second_key must be {want} bytes ({EMBEDDING_DIM} little-endian int16), "
            f"got {len(data)} bytes"
        )
    return np.frombuffer(data, dtype="<i2").astype(np.int16)


def second_key_to_bytes(key: NDArray[np.int16]) -> bytes:
    return np.asarray(key, dtype="<i2").tobytes()


def fine_from_bytes(data: bytes, dim: int) -> NDArray[np.int8]:
    if len(data) != dim:
        raise InvalidInput(f"fine code must be {dim} bytes (int8), got {len(data)}")
    return np.frombuffer(data, dtype=np.int8).copy()


def words_per_code(num_bits: int) -> int:
    """uint64 words needed to hold a num_bits code."""
    return (num_bits + 63) // 64


def to_words(packed: NDArray[np.uint8]) -> NDArray[np.uint64]:
    """(n, nbytes) packed codes -> (n, W) uint64, zero-padded at the end.

    The word byte order is irrelevant to Hamming distance (popcount of xor), so codes
    are reinterpreted in native order; only equality of layout matters.
    """
    packed = np.ascontiguousarray(np.atleast_2d(packed), dtype=np.uint8)
    n, nbytes = packed.shape
    width = -(-nbytes // 8) * 8
    if width != nbytes:
        padded = np.zeros((n, width), dtype=np.uint8)
        padded[:, :nbytes] = packed
        packed = padded
    return packed.view(np.uint64).reshape(n, width // 8)


def cosine(a: NDArray[np.integer], b: NDArray[np.integer]) -> NDArray[np.float64]:
    """Cosine between rows of a (n, d) and vector b (d,); 0 where a norm is 0."""
    a64 = np.asarray(a, dtype=np.float64)
    b64 = np.asarray(b, dtype=np.float64)
    dots = a64 @ b64
    norms = np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64)
    out = np.zeros_like(dots)
    np.divide(dots, norms, out=out, where=norms > 0)
    return out
