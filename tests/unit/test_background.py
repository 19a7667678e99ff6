"""The background bank: its similarity against a brute-force reference, its file in a
bundle, and refusals of a bank that cannot be used."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from copyfree.background import BANK_FILE, BackgroundBank, write_bank
from copyfree.bundle import read_manifest
from copyfree.codes import second_key
from tests.utils.tiny_bundles import make_detection_bundle


def test_similarity_is_the_mean_of_the_top_k_cosines() -> None:
    rng = np.random.default_rng(3)
    bank_keys = second_key(rng.normal(0, 1, (50, 64)) * 0.1)
    queries = second_key(rng.normal(0, 1, (7, 64)) * 0.1)
    bank = BackgroundBank.of(bank_keys, top_k=4)
    a = queries.astype(np.float64)
    b = bank_keys.astype(np.float64)
    cos = (a / np.linalg.norm(a, axis=1)[:, None]) @ (
        b / np.linalg.norm(b, axis=1)[:, None]
    ).T
    want = np.sort(cos, axis=1)[:, -4:].mean(axis=1)
    np.testing.assert_allclose(bank.similarity(queries), want, atol=1e-5)
    # a bank member is its own nearest key
    assert bank.similarity(bank_keys[:1])[0] >= np.sort(cos[0])[-4:].mean() - 1e-6
    assert bank.similarity(np.zeros((0, 64), np.int16)).shape == (0,)


def test_a_bank_written_into_a_bundle_loads_and_keeps_the_version(
    tmp_path: Path,
) -> None:
    bundle = make_detection_bundle(tmp_path / "b")
    before = read_manifest(bundle)
    assert BackgroundBank.load(bundle, before) is None  # no bank: no background
    keys = second_key(np.random.default_rng(1).normal(0, 0.1, (12, 64)))
    after = write_bank(bundle, keys, 2, {"source": "test"})
    assert after.version == before.version and after.thresholds == before.thresholds
    assert after.extra["background"] == {
        "file": BANK_FILE, "top_k": 2, "images": 12, "source": "test"
    }  # fmt: skip
    bank = BackgroundBank.load(bundle, read_manifest(bundle))
    assert bank is not None and bank.top_k == 2
    np.testing.assert_allclose(
        bank.similarity(keys), BackgroundBank.of(keys, 2).similarity(keys)
    )


def test_unusable_banks_are_refused(tmp_path: Path) -> None:
    keys = second_key(np.random.default_rng(2).normal(0, 0.1, (3, 64)))
    with pytest.raises(ValueError, match="top_k"):
        BackgroundBank.of(keys, top_k=4)  # more neighbours than bank images
    bundle = make_detection_bundle(tmp_path / "b")
    with pytest.raises(ValueError, match="top_k"):
        write_bank(bundle, keys, 0, {})
    write_bank(bundle, keys, 2, {})
    np.save(bundle / BANK_FILE, keys.astype(np.float32))  # not int16 keys
    with pytest.raises(ValueError, match="int16"):
        BackgroundBank.load(bundle, read_manifest(bundle))
