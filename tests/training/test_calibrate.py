"""Calibration: the T2 / require_second_key shortcut equals the real Detect and
decision, the chosen thresholds meet the target on the calibration data, and writing
them keeps the bundle loadable with its version. Random keys and the tiny ONNX bundle
(no torch)."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from copyfree.bundle import Thresholds, read_manifest
from copyfree.codes import first_key, second_key
from copyfree_train.calibrate import (
    Queries,
    Registry,
    calibrate,
    collect_picks,
    outcomes,
    write_thresholds,
)
from tests.utils.tiny_bundles import make_detection_bundle


def _keys(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return first_key(z, np.zeros(64)), second_key(z)


@pytest.fixture(scope="module")
def setup() -> tuple[Registry, Queries]:
    """40 registered embeddings; positives = noisy copies (some heavy), distractors =
    fresh embeddings plus a few near one registered item (look-alikes)."""
    rng = np.random.default_rng(5)
    reg = rng.normal(0, 1, (40, 64))
    ids = [f"r{i:02d}" for i in range(40)]
    registry = Registry(ids, *_keys(reg))
    light = reg[:20] + rng.normal(0, 0.15, (20, 64))
    heavy = reg[20:] + rng.normal(0, 0.7, (20, 64))
    fresh = rng.normal(0, 1, (30, 64))
    alike = reg[:10] + rng.normal(0, 0.9, (10, 64))
    z = np.concatenate([reg, light, heavy, fresh, alike])
    fk, sk = _keys(z)
    truth = ids + ids[:20] + ids[20:] + [None] * 40
    groups = ["original"] * 40 + ["weak"] * 20 + ["hybrid"] * 20 + ["distractor"] * 40
    # Trimmed views: the heavy copies' are light copies (a border taken off), some
    # fresh distractors' land near a registered item; every third query has none.
    view = z.copy()
    view[60:80] = reg[20:] + rng.normal(0, 0.2, (20, 64))
    view[80:90] = reg[30:] + rng.normal(0, 0.3, (10, 64))
    tfk, tsk = _keys(view)
    has = np.arange(len(z)) % 3 != 0
    return registry, Queries(fk, sk, truth, groups, tfk, tsk, has)


GRID = {"t1_grid": (0, 4, 8, 12, 16, 24), "k_grid": (0, 4, 16)}


def test_shortcut_equals_real_detect(setup: tuple[Registry, Queries]) -> None:
    registry, q = setup
    t1_grid, k_grid = (0, 6, 14, 24), (0, 1, 16)
    picks = collect_picks(registry, q, t1_grid, k_grid)
    by_view = 0
    for t1, k, t2, req, view in itertools.product(
        t1_grid, k_grid, (0.3, 0.8, 0.95), (False, True), (False, True)
    ):
        t = Thresholds(t1, t2, k, req, view)
        real = registry.detect_all(q, t)
        matched, right = outcomes(picks, t)
        assert matched.tolist() == [v.matched is not None for v in real]
        want = [v.matched == tr for v, tr in zip(real, q.truth, strict=True)]
        assert right.tolist() == [m and w for m, w in zip(matched, want, strict=True)]
        used = [v.trimmed for v in real]
        assert view or not any(used)
        assert not any(u and not h for u, h in zip(used, q.has_trimmed, strict=True))
        by_view += sum(used)
    assert by_view > 0  # the trimmed view really decided some of them


def test_trimmed_view_is_chosen_when_it_pays() -> None:
    """Copies that only their trimmed view identifies (a heavy change as is, a light
    one once trimmed): calibration turns the view on, within the target."""
    rng = np.random.default_rng(9)
    reg = rng.normal(0, 1, (30, 64))
    ids = [f"r{i:02d}" for i in range(30)]
    registry = Registry(ids, *_keys(reg))
    framed = reg + rng.normal(0, 4.0, (30, 64))  # cosine ~0.25 to its original
    fresh = rng.normal(0, 1, (40, 64))
    z = np.concatenate([reg, framed, fresh])
    view = np.concatenate([reg, reg + rng.normal(0, 0.2, (30, 64)), fresh])
    truth = ids + ids + [None] * 40
    groups = ["original"] * 30 + ["practical"] * 30 + ["distractor"] * 40
    has = np.array([False] * 30 + [True] * 30 + [False] * 40)
    q = Queries(*_keys(z), truth, groups, *_keys(view), has)
    cal, _ = calibrate(registry, q, target_fmr=0.05, **GRID)
    plain, _ = calibrate(
        registry, Queries(*_keys(z), truth, groups), target_fmr=0.05, **GRID
    )
    assert not plain.thresholds.trimmed_view
    assert cal.thresholds.trimmed_view
    assert cal.detection["practical"] > plain.detection["practical"] + 0.5
    assert cal.false_match_rate <= 0.05


def test_calibration_meets_the_target(setup: tuple[Registry, Queries]) -> None:
    registry, q = setup
    picks = collect_picks(registry, q, **GRID)
    cal, front = calibrate(registry, q, target_fmr=0.05, picks=picks, **GRID)
    assert cal.feasible
    t = cal.thresholds
    real = registry.detect_all(q, t)
    groups = np.array(q.groups)
    fm = np.array([v.matched is not None for v in real])[groups == "distractor"]
    assert fm.mean() <= 0.05 and fm.mean() == pytest.approx(cal.false_match_rate)
    originals = [
        v.matched for v, g in zip(real, q.groups, strict=True) if g == "original"
    ]
    assert originals == q.truth[:40]  # every unmodified registered image, right id
    assert cal.detection["weak"] >= cal.detection["hybrid"]
    # a looser target never detects less
    looser, _ = calibrate(registry, q, target_fmr=0.2, picks=picks, **GRID)
    assert looser.detection["hybrid"] >= cal.detection["hybrid"]
    fmrs = [r["fmr"] for r in front]
    assert fmrs == sorted(fmrs)


def test_write_thresholds_keeps_the_bundle_loadable(
    setup: tuple[Registry, Queries], tmp_path: Path
) -> None:
    registry, q = setup
    bundle = make_detection_bundle(tmp_path / "bundle")
    before = read_manifest(bundle)
    cal, _ = calibrate(registry, q, target_fmr=0.05, **GRID)
    write_thresholds(bundle, cal, {"tool": "test"})
    after = read_manifest(bundle)
    assert after.thresholds == cal.thresholds
    assert after.version == before.version  # same weights, same keys
    assert after.extra["theta"] == before.extra["theta"]
    assert after.extra["training"] == before.extra["training"]
    raw = json.loads((bundle / "manifest.json").read_text())
    assert raw["calibration"]["previous_thresholds"] == before.thresholds.to_dict()
    assert raw["format_version"] == 1
    pytest.importorskip("onnxruntime")
    from copyfree_encoder.model import BundleModel

    model = BundleModel(bundle, providers="cpu")
    assert model.manifest.thresholds == cal.thresholds


def _with_background(q: Queries, seed: int) -> Queries:
    """q with a background similarity per query: high for the look-alike distractors
    (they resemble many images), low for the rest."""
    rng = np.random.default_rng(seed)
    n = len(q)
    bg = rng.uniform(0.2, 0.5, n).astype(np.float32)
    bg[-10:] = rng.uniform(0.85, 0.95, 10)  # the look-alikes of `setup`
    tbg = (bg + rng.uniform(-0.05, 0.05, n)).astype(np.float32)
    return replace(q, background=bg, trimmed_background=tbg)


def test_shortcut_equals_real_detect_with_a_background_weight(
    setup: tuple[Registry, Queries],
) -> None:
    registry, plain = setup
    q = _with_background(plain, 4)
    t1_grid, k_grid = (0, 8, 24), (0, 16)
    picks = collect_picks(registry, q, t1_grid, k_grid)
    for t1, k, t2, req, view, w in itertools.product(
        t1_grid, k_grid, (0.3, 0.5, 0.8), (False, True), (False, True), (0.3, 0.6)
    ):
        t = Thresholds(t1, t2, k, req, view, w)
        real = registry.detect_all(q, t)
        matched, right = outcomes(picks, t)
        assert matched.tolist() == [v.matched is not None for v in real]
        want = [v.matched == tr for v, tr in zip(real, q.truth, strict=True)]
        assert right.tolist() == [m and w for m, w in zip(matched, want, strict=True)]


def test_a_background_weight_is_chosen_when_it_pays(
    setup: tuple[Registry, Queries],
) -> None:
    """Look-alikes with a high background similarity: weighing it lets T2 drop for
    the rest, so more copies are found at the same false-match target. Without a
    bank (background None) the weight stays 0."""
    registry, plain = setup
    q = _with_background(plain, 4)
    cal, _ = calibrate(registry, q, target_fmr=0.05, **GRID)
    base, _ = calibrate(registry, plain, target_fmr=0.05, **GRID)
    assert base.thresholds.background_weight == 0.0
    assert cal.thresholds.background_weight > 0.0
    assert cal.false_match_rate <= 0.05
    mean = np.mean([cal.detection[g] for g in ("weak", "hybrid")])
    assert mean > np.mean([base.detection[g] for g in ("weak", "hybrid")])
    real = registry.detect_all(q, cal.thresholds)
    fm = [
        v.matched is not None
        for v, g in zip(real, q.groups, strict=True)
        if g == "distractor"
    ]
    assert np.mean(fm) == pytest.approx(cal.false_match_rate)
