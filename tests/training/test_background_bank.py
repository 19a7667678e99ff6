"""`copyfree background`: a folder of images -> the bundle's bank, keyed exactly as
the encoder keys a query, with clear refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from copyfree.background import BackgroundBank
from copyfree.bundle import read_manifest
from copyfree.preprocess import decode, to_input
from copyfree_cli.__main__ import main as cli
from copyfree_encoder.model import BundleModel
from tests.utils.images import make_image_bytes
from tests.utils.tiny_bundles import make_detection_bundle


def test_the_bank_holds_the_encoders_keys_of_the_folder(tmp_path: Path) -> None:
    bundle = make_detection_bundle(tmp_path / "bundle")
    folder = tmp_path / "ordinary"
    folder.mkdir()
    images = [make_image_bytes(s, fmt="JPEG") for s in range(6)]
    for i, data in enumerate(images):
        (folder / f"img-{i}.jpg").write_bytes(data)
    (folder / "broken.jpg").write_bytes(b"not an image")
    version = read_manifest(bundle).version
    assert cli(["background", "--bundle", str(bundle), "--images", str(folder),
                "--top-k", "2", "--no-progress"]) == 0  # fmt: skip
    manifest = read_manifest(bundle)
    assert manifest.version == version
    assert manifest.extra["background"]["images"] == 6  # the broken file skipped
    bank = BackgroundBank.load(bundle, manifest)
    assert bank is not None and bank.top_k == 2
    model = BundleModel(bundle, providers="cpu")
    keys = model.run(np.stack([to_input(decode(b), model.spec) for b in images]))
    want = BackgroundBank.of(keys["second_key"], 2)
    assert sorted(map(tuple, np.round(bank.keys, 5))) == sorted(
        map(tuple, np.round(want.keys, 5))
    )


def test_too_few_images_or_a_retrieval_bundle_are_refused(tmp_path: Path) -> None:
    from tests.utils.tiny_bundles import make_retrieval_bundle

    bundle = make_detection_bundle(tmp_path / "bundle")
    folder = tmp_path / "two"
    folder.mkdir()
    for i in range(2):
        (folder / f"{i}.png").write_bytes(make_image_bytes(i))
    with pytest.raises(SystemExit, match="top-k"):
        cli(["background", "--bundle", str(bundle), "--images", str(folder)])
    retrieval = make_retrieval_bundle(tmp_path / "ret")
    with pytest.raises(SystemExit, match="not a detection bundle"):
        cli(["background", "--bundle", str(retrieval), "--images", str(folder)])
