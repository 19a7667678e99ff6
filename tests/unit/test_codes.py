"""Key packing and Hamming helpers against plain-Python oracles."""

from __future__ import annotations

import numpy as np
import pytest

from copyfree import codes, hamming
from copyfree.errors import InvalidInput


def test_first_key_is_msb_first_packbits(rng: np.random.Generator) -> None:
    z = rng.normal(size=(5, 64))
    theta = rng.normal(size=64) * 0.1
    packed = codes.first_key(z, theta)
    assert packed.shape == (5, 8) and packed.dtype == np.uint8
    for row, zi in zip(packed, z, strict=True):
        bits = "".join("1" if v > t else "0" for v, t in zip(zi, theta, strict=True))
        assert int.from_bytes(row.tobytes(), "big") == int(bits, 2)


def test_second_key_rounds_and_saturates() -> None:
    z = np.array([0.12345, -0.0005, 40.0, -40.0, 0.0015])
    assert codes.second_key(z).tolist() == [123, 0, 32767, -32768, 2]


def test_second_key_wire_round_trip(rng: np.random.Generator) -> None:
    key = rng.integers(-32768, 32767, size=64).astype(np.int16)
    assert (codes.second_key_from_bytes(codes.second_key_to_bytes(key)) == key).all()


def test_second_key_rejects_wrong_length() -> None:
    with pytest.raises(InvalidInput, match="128 bytes"):
        codes.second_key_from_bytes(b"\x00" * 10)


def test_check_packed_names_expected_length() -> None:
    with pytest.raises(InvalidInput, match="first_key must be 8 bytes"):
        codes.check_packed(b"\x00" * 7, 64, "first_key")


@pytest.mark.parametrize("bits", [8, 16, 24, 64, 72, 256])
def test_distances_equal_python_popcount(rng: np.random.Generator, bits: int) -> None:
    packed = rng.integers(0, 256, size=(300, bits // 8), dtype=np.uint8)
    query = rng.integers(0, 256, size=(1, bits // 8), dtype=np.uint8)
    got = hamming.distances(codes.to_words(packed), codes.to_words(query)[0])
    q = int.from_bytes(query[0].tobytes(), "big")
    want = [bin(int.from_bytes(r.tobytes(), "big") ^ q).count("1") for r in packed]
    assert got.tolist() == want


def test_within_radius_is_inclusive(rng: np.random.Generator) -> None:
    base = rng.integers(0, 256, size=8, dtype=np.uint8)
    bits = codes.unpack_bits(base, 64)
    rows = []
    for flips in (11, 12, 13):
        b = bits.copy()
        b[:flips] ^= 1
        rows.append(codes.pack_bits(b))
    db = codes.to_words(np.stack(rows))
    got_rows, got_d = hamming.within_radius(db, codes.to_words(base[None])[0], 12)
    assert got_rows.tolist() == [0, 1] and got_d.tolist() == [11, 12]


def test_nearest_rows_keeps_every_tie() -> None:
    d = np.array([3, 1, 2, 2, 2, 5], dtype=np.int32)
    assert sorted(hamming.nearest_rows(d, 2).tolist()) == [1, 2, 3, 4]


def test_cosine_handles_zero_vectors() -> None:
    a = np.array([[1, 0], [0, 0], [-2, 0]], dtype=np.int16)
    assert codes.cosine(a, np.array([3, 0])).tolist() == [1.0, 0.0, -1.0]
