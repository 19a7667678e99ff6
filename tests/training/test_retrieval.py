"""Retrieval model: EfficientNet-Lite0 backbone, TBH head, training loop, bundle export.

All images are drawn here with PIL in tmp_path (never the dev corpus). The full
backbone export + ONNX Runtime parity runs once (module-scoped fixture).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from copyfree.bundle import INPUT_NAME, MODEL_FILE, RETRIEVAL_OUTPUTS, read_manifest  # noqa: E402
from copyfree.codes import pack_bits  # noqa: E402
from copyfree.preprocess import to_input  # noqa: E402
from copyfree_train.backbone import (  # noqa: E402
    EfficientNetLite0,
    build_backbone,
    extract_features,
)
from copyfree_train.data import load_rgb, scan_folder  # noqa: E402
from copyfree_train.export_retrieve import (  # noqa: E402
    RetrievalGraph,
    export_retrieval_bundle,
)
from copyfree_train.onnx_export import round_weights_to_fp16  # noqa: E402
from copyfree_train.tbh import (  # noqa: E402
    TBH,
    LossWeights,
    TBHConfig,
    actor_loss,
    binarise,
    code_adjacency,
    critic_loss,
    pack_code,
)
from copyfree_train.train_retrieve import (  # noqa: E402
    RetrieveTrainConfig,
    load_checkpoint,
    ranking_distance,
    ranking_metrics,
    train_retrieval,
)

pytestmark = pytest.mark.torch

LABELS = ("shapes/circles", "shapes/boxes", "patterns/stripes")


def _draw(label: str, rng: np.random.Generator) -> Image.Image:
    im = Image.new("RGB", (72, 56), (255, 255, 255))
    d = ImageDraw.Draw(im)
    x, y = (int(v) for v in rng.integers(4, 24, 2))
    if label == LABELS[0]:
        d.ellipse([x, y, x + 30, y + 30], fill=(220, int(rng.integers(0, 80)), 30))
    elif label == LABELS[1]:
        d.rectangle(
            [x, y, x + 40, y + 24], fill=(30, 60, 200 + int(rng.integers(0, 50)))
        )
    else:
        for i in range(0, 72, 8):
            d.line(
                [i, 0, i + 20, 56],
                fill=(20, 150 + int(rng.integers(0, 90)), 40),
                width=3,
            )
    return im


def make_folder(root: Path, per_label: int = 7, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True)
    rows = []
    for li, label in enumerate(LABELS):
        for j in range(per_label):
            item = f"t{li}-{j:03d}"
            _draw(label, rng).save(root / "img" / f"{item}.jpg", quality=90)
            rows.append({"id": item, "file": f"img/{item}.jpg", "label": label})
    with (root / "manifest.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "file", "label"])
        w.writeheader()
        w.writerows(rows)
    return root


@pytest.fixture(scope="module")
def backbone() -> EfficientNetLite0:
    return EfficientNetLite0()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(tmp_path_factory.mktemp("retrieval-images"))


def test_backbone_loads_shipped_weights_strictly(backbone: EfficientNetLite0) -> None:
    # strict=True happens in the constructor; a mismatch would have raised.
    assert backbone.weights_id().startswith("efficientnet-lite0")
    spec = backbone.spec
    assert (spec.size, spec.channels) == (224, 3)
    x = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (2, 3, 224, 224)))
    with torch.no_grad():
        feats = backbone(x.float())
    assert feats.shape == (2, 1280)
    assert torch.all(feats >= 0) and torch.all(feats <= 6)  # ReLU6, then mean


def test_bn_fusion_keeps_the_function(backbone: EfficientNetLite0) -> None:
    fused = EfficientNetLite0()
    fused.fuse_for_export()
    x = torch.rand(2, 3, 224, 224) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(fused(x), backbone(x), atol=1e-4)


def test_feature_cache_is_reused(folder: Path, tmp_path: Path, backbone) -> None:
    records = scan_folder(folder)[:4]
    first = extract_features(backbone, records, tmp_path, progress=False)
    assert first.shape == (4, 1280)
    assert len(list(tmp_path.glob("*.npy"))) == 1

    class Exploding(EfficientNetLite0):
        def forward(self, images):  # noqa: ARG002
            raise AssertionError("recomputed despite the cache")

    again = extract_features(Exploding(), records, tmp_path, progress=False)
    np.testing.assert_array_equal(first, again)
    # A different file list is a different cache entry.
    extract_features(backbone, records[:3], tmp_path, progress=False)
    assert len(list(tmp_path.glob("*.npy"))) == 2


def test_tbh_step_on_random_features() -> None:
    torch.manual_seed(0)
    cfg = TBHConfig(feature_dim=40, bits=16, hidden_dim=32, continuous_dim=8)
    model = TBH(cfg)
    feats = torch.rand(12, 40)
    model.fit_normalisation(feats)
    out = model(feats, stochastic=True)
    assert out["b"].shape == (12, 16) and out["recon"].shape == (12, 40)
    assert set(torch.unique(out["b"].detach()).tolist()) <= {0.0, 1.0}
    adj = out["adjacency"].detach()
    assert torch.allclose(torch.diag(adj), torch.ones(12))
    assert adj.min() >= 0 and adj.max() <= 1
    for use_sim in (True, False):
        model.zero_grad()
        loss, parts = actor_loss(
            model, model(feats), LossWeights(use_similarity=use_sim)
        )
        loss.backward()
        assert model.binary_head.weight.grad is not None
        assert {"recon", "adv_gen", "similarity", "actor"} <= set(parts)
    c_loss, _ = critic_loss(model, model(feats))
    c_loss.backward()
    # Eval binarisation is the exported rule: bit = logits > 0.
    logits = model.code_logits(feats)
    assert torch.equal(binarise(logits, stochastic=False), (logits > 0).float())
    ham = 16 * (1 - code_adjacency((logits > 0).float()))
    want = (logits[:, None, :] > 0) != (logits[None, :, :] > 0)
    assert torch.equal(ham.round().long(), want.sum(-1))


@pytest.mark.parametrize("bits", [16, 32, 64])
def test_pack_code_matches_pack_bits(bits: int) -> None:
    logits = torch.randn(5, bits)
    got = pack_code(logits).numpy()
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, pack_bits((logits > 0).numpy()))


def test_map_and_tie_breaking() -> None:
    q = np.array([[0, 0, 0, 0, 0, 0, 0, 0]], dtype=np.uint8)
    db = np.array([[0] * 8, [0] * 8, [1] + [0] * 7], dtype=np.uint8)
    labels_db = np.array(["b", "a", "a"], dtype=object)
    labels_q = np.array(["a"], dtype=object)
    plain = ranking_metrics(ranking_distance(q, db), labels_q, labels_db, k=3)
    # ranks: b (tie, db order), a, a -> AP = (1/2 + 2/3) / 2
    assert plain["mAP@3"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    fine_q = np.array([[1.0, 0.0]])
    fine_db = np.array([[0.0, 1.0], [1.0, 0.1], [1.0, 0.0]])
    tie = ranking_metrics(
        ranking_distance(q, db, fine_q, fine_db), labels_q, labels_db, 3
    )
    # the fine vector moves the relevant tie first: a, b, a
    assert tie["mAP@3"] == pytest.approx((1 + 2 / 3) / 2)


def test_train_export_parity(folder: Path, tmp_path: Path) -> None:
    config = RetrieveTrainConfig(
        images=folder,
        out=tmp_path / "run",
        bits=16,
        epochs=3,
        batch_size=8,
        hidden_dim=64,
        continuous_dim=16,
        val_fraction=0.15,
        query_fraction=0.15,
        map_k=10,
        fine_dim=8,
        max_steps=4,
        progress=False,
        threads=2,
    )
    result = train_retrieval(config)
    for name in ("best.pt", "config.json", "history.csv", "curves.png", "metrics.json"):
        assert (tmp_path / "run" / name).is_file(), name
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] <= 4 and 0.0 <= metrics["test"]["tbh"]["mAP@10"] <= 1.0

    bundle = export_retrieval_bundle(
        result.checkpoint, tmp_path / "bundle", date="20260101"
    )
    manifest = read_manifest(bundle)
    assert manifest.kind == "retrieval" and manifest.code_bits == 16
    assert manifest.fine_dim == 8
    assert manifest.name == "retrieve-tbh16"
    assert manifest.version.startswith("retrieve-tbh16-20260101-")
    assert manifest.preprocess == build_backbone("efficientnet_lite0").spec
    assert "mAP@10" in manifest.extra["evaluation"]
    assert manifest.extra["parity"]["identical"]["code"] is True

    # Independent check: ORT on the bundle vs the torch graph with the same rounding.
    _, head, _ = load_checkpoint(result.checkpoint)
    bb = build_backbone("efficientnet_lite0")
    bb.fuse_for_export()
    graph = RetrievalGraph(bb, head, with_float=True).eval()
    round_weights_to_fp16(graph)
    records = scan_folder(folder)
    x = np.stack([to_input(load_rgb(r.path), bb.spec) for r in records[::4]])
    session = ort.InferenceSession(
        str(bundle / MODEL_FILE), providers=["CPUExecutionProvider"]
    )
    assert [o.name for o in session.get_outputs()] == list(RETRIEVAL_OUTPUTS)
    code, fine = session.run(list(RETRIEVAL_OUTPUTS), {INPUT_NAME: x})
    with torch.no_grad():
        _, t_fine, logits, _ = (t.numpy() for t in graph(torch.from_numpy(x)))
    assert code.dtype == np.uint8 and code.shape == (len(x), 2)
    np.testing.assert_array_equal(code, pack_bits(logits > 0))
    assert fine.dtype == np.int8 and fine.shape == (len(x), 8)
    assert np.abs(fine.astype(int) - t_fine.astype(int)).max() <= 1
    # Dynamic batch: one image alone gives the same code.
    one, _ = session.run(list(RETRIEVAL_OUTPUTS), {INPUT_NAME: x[:1]})
    np.testing.assert_array_equal(one, code[:1])
    assert (bundle / MODEL_FILE).stat().st_size < 14 * 1024 * 1024
