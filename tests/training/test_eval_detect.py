"""`copyfree eval detect` end to end on generated images: a CVAE trained for one step,
exported, then the split (siblings as hard negatives), every attack, seed-004 metrics,
1:N through the real index and decision, calibration, report and figures."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from copyfree_train import attacks as A  # noqa: E402
from copyfree_train.eval_detect import (  # noqa: E402
    DetectEvalConfig,
    compute_codes,
    prepare,
    run,
    same_picture_as,
    split_heldout,
)
from copyfree_train.export_detect import export_detection_bundle  # noqa: E402
from copyfree_train.train_detect import (  # noqa: E402
    DetectTrainConfig,
    train_detection,
    training_records,
)
from tests.utils.images import make_picture  # noqa: E402

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("evaldetect")
    images = tmp / "images"
    images.mkdir()
    for i in range(36):
        make_picture(i, (96 + 4 * i, 80)).save(images / f"im{i:02d}.png")
    config = DetectTrainConfig(
        images=images,
        out=tmp / "run",
        epochs=1,
        batch_size=8,
        max_steps=1,
        holdout=0.5,
        threads=2,
    )
    ckpt = train_detection(config)
    _, held = training_records(config)
    # Look-alike pairs inside the held-out part: hard negatives for the split.
    ids = [r.item_id for r in held]
    rows = ["a,b,kind"] + [f"{ids[i]},{ids[i + 1]},variant" for i in (0, 2, 4)]
    (images / "near_duplicates.csv").write_text("\n".join(rows) + "\n")
    return images, export_detection_bundle(ckpt, images, tmp / "bundle")


def test_split_keeps_siblings_of_registered_images_as_distractors() -> None:
    from copyfree.folders import ImageRecord

    held = [ImageRecord(Path(f"{i}.png"), f"i{i:02d}", "") for i in range(20)]
    pairs = [("i00", "i01"), ("i01", "i02"), ("i05", "i06"), ("i10", "x99")]
    reg, calib, test, with_sib = split_heldout(held, pairs, 6, seed=0)
    assert with_sib == 5
    assert sorted(reg + calib + test) == list(range(20))
    assert len(reg) == 6 and abs(len(calib) - len(test)) <= 1
    for group in ({0, 1, 2}, {5, 6}):
        assert len(group & set(reg)) == 1  # one registered, the rest distractors
    assert split_heldout(held, pairs, 6, seed=0) == (reg, calib, test, with_sib)


def test_same_picture_rule_drops_copies_but_keeps_recolours(tmp_path: Path) -> None:
    from PIL import Image

    from copyfree.folders import ImageRecord

    def rec(name: str, image: Image.Image, **kw: object) -> ImageRecord:
        path = tmp_path / name
        image.save(path, **kw)  # type: ignore[arg-type]
        return ImageRecord(path, name, "")

    original = make_picture(3, (120, 90))
    rgb = np.asarray(original).copy()
    swapped = Image.fromarray(rgb[..., ::-1].copy())  # same shapes, other colours
    other = make_picture(9, (120, 90))
    registered = [rec("orig.png", original), rec("other.png", other)]
    candidates = [
        rec("copy.jpg", original, quality=90),  # the same picture, re-encoded
        rec("recolour.png", swapped),
        rec("unrelated.png", make_picture(17, (120, 90))),
    ]
    assert same_picture_as(candidates, registered).tolist() == [True, False, False]
    assert same_picture_as([], registered).size == 0


def test_eval_detect_end_to_end(bundle: tuple[Path, Path], tmp_path: Path) -> None:
    images, bundle_dir = bundle
    hashers = ("keys", "phash", "pdq")
    config = DetectEvalConfig(
        images=images,
        bundle=bundle_dir,
        out=tmp_path / "out",
        cache_dir=tmp_path / "cache",
        figures=tmp_path / "img",
        registered=6,
        per_attack=1,
        hashers=hashers,
        target_fmr=0.1,
    )
    data = prepare(config)
    assert len(data.records) == 18  # the bundle's held-out half, nothing else
    assert not set(data.registered) & set(
        data.calib_distractors + data.test_distractors
    )
    attacked = {q.attack for q in data.queries if q.role == "positive" and q.attack}
    assert attacked == {a.key for a in A.suite()}  # every attack, every parameter

    result = run(config)
    for f in ("report.md", "report.json", "detect-det.png", "detect-attacks.png"):
        assert (config.out / f).stat().st_size > 0
    assert (config.figures / "detect-det.png").is_file()
    s4 = result["seed004"]
    assert {"keys", "phash"} <= set(s4)
    for name, m in s4.items():
        assert m["families_averaged"] == 25, name
        assert m["fp_rate_at_tau"] <= 0.01
        assert 0.0 <= m["avg25_f1"] <= 1.0
        assert set(A.SEED004_FAMILIES) <= set(m["per_family"])
    ident = result["identification"]
    assert {"keys@bundle", "keys@calibrated", "phash"} <= set(ident)
    cal = result["calibration"]
    if cal["feasible"]:
        assert ident["keys@calibrated"]["false_match_calibration"] <= 0.1
    assert (
        ident["keys@calibrated"]["detection"]["original"] == 1.0 or not cal["feasible"]
    )
    report = (config.out / "report.md").read_text()
    assert "avg F1 (25)" in report and "false match, test distractors" in report
    assert json.loads((config.out / "report.json").read_text())["bundle"]
    # a second run reads every code from the cache: the same arrays
    cached = compute_codes(config, data, ["keys", "phash"])
    fresh = compute_codes(replace(config, cache_dir=tmp_path / "c2"), data, ["keys"])
    np.testing.assert_array_equal(
        cached["keys"]["first_key"], fresh["keys"]["first_key"]
    )
    assert list((tmp_path / "cache").glob("keys-*.npz"))


def test_suite_views_with_contrastive_term_train(bundle: tuple[Path, Path]) -> None:
    images, _ = bundle
    out = images.parent / "suite-run"
    config = DetectTrainConfig(
        images=images,
        out=out,
        epochs=1,
        batch_size=8,
        max_steps=1,
        holdout=0.5,
        threads=2,
        views="suite",
        contrastive=1.0,
    )
    train_detection(config)
    rows = (out / "losses.csv").read_text().splitlines()
    header, first = rows[0].split(","), rows[1].split(",")
    assert float(first[header.index("contrastive")]) > 0
    with pytest.raises(ValueError, match="views"):
        train_detection(replace(config, out=images.parent / "bad", views="nope"))
