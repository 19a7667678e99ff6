"""Request builders for the index integration tests (imported by the test modules)."""

from __future__ import annotations

import numpy as np

from copyfree.v1 import common_pb2, index_pb2

CVAE = common_pb2.ModelRef(name="cvae", version="1.0.0")
TBH = common_pb2.ModelRef(name="tbh", version="1.0.0")
REGISTRY = common_pb2.COLLECTION_KIND_REGISTRY
COPYRIGHT_FREE = common_pb2.COLLECTION_KIND_COPYRIGHT_FREE


def random_keys(rng: np.random.Generator) -> common_pb2.DetectionKeys:
    return common_pb2.DetectionKeys(
        first_key=rng.integers(0, 256, 8, dtype=np.uint8).tobytes(),
        second_key=rng.integers(-2000, 2000, 64).astype("<i2").tobytes(),
    )


def near_copy(
    keys: common_pb2.DetectionKeys, bits: int, rng: np.random.Generator
) -> common_pb2.DetectionKeys:
    """The same keys with `bits` first-key bits flipped and a little noise on k2."""
    b = np.unpackbits(np.frombuffer(keys.first_key, np.uint8))
    b[rng.choice(64, bits, replace=False)] ^= 1
    k2 = np.frombuffer(keys.second_key, "<i2").astype(np.int32) + rng.integers(
        -20, 20, 64
    )
    return common_pb2.DetectionKeys(
        first_key=np.packbits(b).tobytes(), second_key=k2.astype("<i2").tobytes()
    )


def random_code(
    rng: np.random.Generator, bits: int = 16, fine: int = 16
) -> common_pb2.RetrievalCode:
    return common_pb2.RetrievalCode(
        code=rng.integers(0, 256, bits // 8, dtype=np.uint8).tobytes(),
        code_bits=bits,
        fine=rng.integers(-128, 128, fine).astype(np.int8).tobytes(),
    )


def registry_item(
    item_id: str, keys: common_pb2.DetectionKeys, title: str = ""
) -> index_pb2.IndexItem:
    return index_pb2.IndexItem(
        id=item_id,
        keys=keys,
        metadata=common_pb2.WorkMetadata(
            title=title or f"work {item_id}", owner="KOLAA", licence="KOLAA registry"
        ),
    )


def free_item(item_id: str, code: common_pb2.RetrievalCode) -> index_pb2.IndexItem:
    return index_pb2.IndexItem(
        id=item_id,
        code=code,
        metadata=common_pb2.WorkMetadata(title=item_id, licence="CC0"),
    )
