"""Retrieval evaluation pieces: the ViT backbone from a local checkpoint, the hashing
baselines (LSH, ITQ, PCA-sign, pHash), t-SNE, the ranking report, and
`copyfree eval retrieve` end to end on a tiny generated folder (never the dev corpus).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from torch import nn  # noqa: E402

from copyfree_train.backbone import ViT, build_backbone, extract_features  # noqa: E402
from copyfree_train.data import scan_folder  # noqa: E402
from copyfree_train.hash_baselines import (  # noqa: E402
    fit_itq,
    fit_lsh,
    fit_pca_sign,
    phash_codes,
)
from copyfree_train.train_retrieve import (  # noqa: E402
    ranking_distance,
    ranking_metrics,
)
from copyfree_train.tsne import kl_divergence, tsne  # noqa: E402
from tests.training.test_retrieval import make_folder  # noqa: E402

pytestmark = pytest.mark.torch

DIM, DEPTH, PATCH, GRID, MLP = 64, 2, 16, 2, 128  # a tiny ViT: 32x32 input, 1 head


def tiny_vit_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in timm's layout (a ViT-B/16 checkpoint's keys, small)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.05

    state = {
        "cls_token": r(1, 1, DIM),
        "pos_embed": r(1, GRID * GRID + 1, DIM),
        "patch_embed.proj.weight": r(DIM, 3, PATCH, PATCH),
        "patch_embed.proj.bias": r(DIM),
        "norm.weight": 1 + r(DIM),
        "norm.bias": r(DIM),
        "head.weight": r(10, DIM),  # classifier: dropped by the loader
        "head.bias": r(10),
    }
    for i in range(DEPTH):
        p = f"blocks.{i}."
        state |= {
            p + "norm1.weight": 1 + r(DIM), p + "norm1.bias": r(DIM),
            p + "attn.qkv.weight": r(3 * DIM, DIM), p + "attn.qkv.bias": r(3 * DIM),
            p + "attn.proj.weight": r(DIM, DIM), p + "attn.proj.bias": r(DIM),
            p + "norm2.weight": 1 + r(DIM), p + "norm2.bias": r(DIM),
            p + "mlp.fc1.weight": r(MLP, DIM), p + "mlp.fc1.bias": r(MLP),
            p + "mlp.fc2.weight": r(DIM, MLP), p + "mlp.fc2.bias": r(DIM),
        }  # fmt: skip
    return state


def to_torchvision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {
        "class_token": state["cls_token"],
        "encoder.pos_embedding": state["pos_embed"],
        "conv_proj.weight": state["patch_embed.proj.weight"],
        "conv_proj.bias": state["patch_embed.proj.bias"],
        "encoder.ln.weight": state["norm.weight"],
        "encoder.ln.bias": state["norm.bias"],
        "heads.head.weight": state["head.weight"],
        "heads.head.bias": state["head.bias"],
    }
    names = {
        "norm1": "ln_1", "norm2": "ln_2",
        "attn.qkv.weight": "self_attention.in_proj_weight",
        "attn.qkv.bias": "self_attention.in_proj_bias",
        "attn.proj": "self_attention.out_proj", "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.3",
    }  # fmt: skip
    for key, value in state.items():
        if key.startswith("blocks."):
            _, i, rest = key.split(".", 2)
            for old, new in names.items():
                if rest.startswith(old):
                    rest = new + rest[len(old) :]
                    break
            out[f"encoder.layers.encoder_layer_{i}.{rest}"] = value
    return out


def reference_vit(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The same network built from torch.nn.MultiheadAttention (independent of ours)."""
    tokens = nn.functional.conv2d(
        x, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], PATCH
    )
    tokens = tokens.flatten(2).transpose(1, 2)
    h = torch.cat([state["cls_token"].expand(len(x), -1, -1), tokens], 1)
    h = h + state["pos_embed"]
    for i in range(DEPTH):
        p = f"blocks.{i}."
        mha = nn.MultiheadAttention(DIM, DIM // 64, batch_first=True)
        mha.in_proj_weight.data = state[p + "attn.qkv.weight"]
        mha.in_proj_bias.data = state[p + "attn.qkv.bias"]
        mha.out_proj.weight.data = state[p + "attn.proj.weight"]
        mha.out_proj.bias.data = state[p + "attn.proj.bias"]
        y = nn.functional.layer_norm(
            h, (DIM,), state[p + "norm1.weight"], state[p + "norm1.bias"], 1e-6
        )
        h = h + mha(y, y, y, need_weights=False)[0]
        y = nn.functional.layer_norm(
            h, (DIM,), state[p + "norm2.weight"], state[p + "norm2.bias"], 1e-6
        )
        y = nn.functional.linear(
            y, state[p + "mlp.fc1.weight"], state[p + "mlp.fc1.bias"]
        )
        y = nn.functional.linear(
            nn.functional.gelu(y),
            state[p + "mlp.fc2.weight"],
            state[p + "mlp.fc2.bias"],
        )
        h = h + y
    h = nn.functional.layer_norm(
        h, (DIM,), state["norm.weight"], state["norm.bias"], 1e-6
    )
    return h[:, 0]


def test_vit_loads_a_local_checkpoint(tmp_path: Path) -> None:
    state = tiny_vit_state()
    path = tmp_path / "vit.pth"
    torch.save({"model": state}, path)  # wrapped, as training scripts often save it
    vit = build_backbone("vit_b16", path)
    assert isinstance(vit, ViT) and vit.layout == "timm"
    assert vit.feature_dim == DIM and vit.spec.size == GRID * PATCH
    assert vit.spec.mean == (0.5, 0.5, 0.5)
    assert vit.weights_id().startswith("vit.pth:")
    x = torch.rand(3, 3, GRID * PATCH, GRID * PATCH) * 2 - 1
    with torch.no_grad():
        got = vit(x)
        want = reference_vit(state, x)
    assert got.shape == (3, DIM)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)

    # torchvision's layout maps onto the same network (ImageNet normalisation).
    tv_path = tmp_path / "vit_tv.pth"
    torch.save(to_torchvision(state), tv_path)
    tv = build_backbone("vit_b16", tv_path)
    assert tv.layout == "torchvision" and tv.spec.mean == (0.485, 0.456, 0.406)
    with torch.no_grad():
        torch.testing.assert_close(tv(x), got)


def test_vit_never_downloads(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="local checkpoint"):
        build_backbone("vit_b16")
    with pytest.raises(FileNotFoundError):
        build_backbone("vit_b16", tmp_path / "missing.pth")
    broken = tiny_vit_state()
    broken["blocks.0.attn.qkv.weight"] = broken["blocks.0.attn.qkv.weight"][:, :10]
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(RuntimeError):  # strict loading: shapes must match
        build_backbone("vit_b16", tmp_path / "broken.pth")
    with pytest.raises(ValueError):
        build_backbone("efficientnet_lite0", tmp_path / "broken.pth")


def test_vit_features_and_onnx_export(tmp_path: Path) -> None:
    """A ViT-backed retrieval graph exports to ONNX with exact code parity."""
    from copyfree_train.export_retrieve import RetrievalGraph, check_retrieval_parity
    from copyfree_train.onnx_export import export_onnx
    from copyfree_train.tbh import TBH, RetrievalHead, TBHConfig

    path = tmp_path / "vit.pth"
    torch.save(tiny_vit_state(), path)
    vit = build_backbone("vit_b16", path)
    folder = make_folder(tmp_path / "imgs", per_label=2)
    records = scan_folder(folder)
    feats = extract_features(vit, records, tmp_path / "cache", progress=False)
    assert feats.shape == (len(records), DIM)
    torch.manual_seed(0)
    tbh = TBH(TBHConfig(feature_dim=DIM, bits=16, hidden_dim=32, continuous_dim=8))
    tbh.fit_normalisation(torch.from_numpy(feats))
    head = RetrievalHead(tbh, "logits", torch.zeros(DIM, 16), 1.0)
    graph = RetrievalGraph(vit, head, with_float=True).eval()
    x = torch.rand(4, 3, 32, 32).numpy() * 2 - 1
    model = export_onnx(
        graph, torch.from_numpy(x[:2]), ("code", "fine", "logits", "fine_float")
    )
    report = check_retrieval_parity(graph, model, x)
    assert report.identical["code"]


def test_lsh_itq_pca_sign() -> None:
    rng = np.random.default_rng(0)
    # Anisotropic data: a few strong directions, like pooled CNN features.
    x = rng.standard_normal((400, 40)) * np.linspace(5, 0.1, 40) + 3.0
    fits = (
        lambda b: fit_lsh(x, b, 1),
        lambda b: fit_pca_sign(x, b),
        lambda b: fit_itq(x, b),
    )
    for fit in fits:
        bits = fit(16)(x)
        assert bits.shape == (400, 16) and bits.dtype == np.uint8
        assert set(np.unique(bits)) <= {0, 1}
    itq, pca = fit_itq(x, 8, iterations=50), fit_pca_sign(x, 8)
    # ITQ's rotation is orthogonal, and it quantises with less error than PCA-sign.
    rot = np.linalg.lstsq(pca.projection, itq.projection, rcond=None)[0]
    np.testing.assert_allclose(rot @ rot.T, np.eye(8), atol=1e-6)

    def quantisation_error(h) -> float:
        v = (x - h.mean) @ h.projection
        return float(np.sum((np.where(v >= 0, 1.0, -1.0) - v) ** 2))

    assert quantisation_error(itq) < quantisation_error(pca)
    # Different seeds, different hyperplanes.
    assert not np.array_equal(fit_lsh(x, 16, 1)(x), fit_lsh(x, 16, 2)(x))


def test_phash_codes_cached(tmp_path: Path) -> None:
    pytest.importorskip("imagehash")
    folder = make_folder(tmp_path / "imgs", per_label=2)
    records = scan_folder(folder)
    c64 = phash_codes(records, 64, tmp_path / "cache", progress=False)
    c32 = phash_codes(records, 32, tmp_path / "cache", progress=False)
    c16 = phash_codes(records, 16, tmp_path / "cache", progress=False)
    assert c64.shape == (len(records), 64) and c16.shape == (len(records), 16)
    np.testing.assert_array_equal(c32, c64[:, :32])
    assert len(list((tmp_path / "cache").glob("phash*.npy"))) == 2  # 16 and 64
    with pytest.raises(ValueError):
        phash_codes(records, 48, tmp_path / "cache")


@pytest.mark.parametrize("seed", [0, 4])  # a fixed rate of 200 ejected a point here
def test_tsne_separates_clusters(seed: int) -> None:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, 10)) * 10
    x = np.concatenate([c + rng.standard_normal((30, 10)) for c in centres])
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    y = tsne(d, perplexity=10, seed=seed)
    assert y.shape == (90, 2) and np.all(np.isfinite(y))
    labels = np.repeat(np.arange(3), 30)
    dy = np.linalg.norm(y[:, None] - y[None], axis=-1)
    np.fill_diagonal(dy, np.inf)
    assert np.mean(labels[dy.argmin(axis=1)] == labels) == 1.0  # 1-NN in the map
    assert kl_divergence(d, y, 10) < kl_divergence(d, rng.standard_normal((90, 2)), 10)


def test_ranking_report_matches_ranking_metrics() -> None:
    from copyfree_train.eval_retrieve import ranking_report

    rng = np.random.default_rng(1)
    q, db = rng.integers(0, 2, (20, 16)), rng.integers(0, 2, (300, 16))
    ql, dl = rng.integers(0, 4, 20), rng.integers(0, 4, 300)
    dist = ranking_distance(q, db)
    rep = ranking_report(dist, ql, dl, (10, 100), (10,))
    for k in (10, 100):
        assert rep[f"mAP@{k}"] == pytest.approx(
            ranking_metrics(dist, ql, dl, k)[f"mAP@{k}"]
        )
    assert rep["P@10"] == pytest.approx(ranking_metrics(dist, ql, dl, 10)["P@10"])


def test_eval_retrieve_cli_end_to_end(tmp_path: Path) -> None:
    """`copyfree eval retrieve` trains the missing runs (tiny), reuses them on a second
    call, and writes the report, the tables and every figure."""
    pytest.importorskip("imagehash")
    from copyfree_cli.__main__ import main
    from copyfree_train.eval_retrieve import EvalConfig, ensure_run, run_config

    folder = make_folder(tmp_path / "imgs", per_label=10)
    out, figs = tmp_path / "eval", tmp_path / "figs"
    argv = [
        "eval", "retrieve", "--images", str(folder), "--out", str(out),
        "--cache-dir", str(tmp_path / "cache"), "--bits", "16,32",
        "--epochs", "2", "--max-steps", "2", "--k", "10,20", "--precision-n", "5",
        "--figures", str(figs), "--quiet",
    ]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["methods"]) == {"16", "32"}
    row = report["methods"]["16"]
    for name in ("TBH+sim", "TBH (no sim)", "TBH+sim +fine", "LSH", "ITQ", "pHash"):
        assert 0.0 <= row[name]["mAP@10"] <= 1.0, name
    assert set(report["targets"]["32"]) == {"sim_minus_lsh", "sim_minus_nosim", "met"}
    assert report["convergence"]["16"]["sim"]["best_step"] <= 2
    md = (out / "report.md").read_text()
    assert "| 16 | TBH+sim |" in md and "| 32 | pHash |" in md
    for name in (
        "retrieve-curves.png", "retrieve-map.png", "retrieve-tsne.png",
        "retrieve-examples-tbh16.png", "retrieve-examples-tbh32.png",
    ):  # fmt: skip
        assert (figs / name).stat().st_size > 1000, name
    # A second call reuses the finished runs (train=False would raise otherwise).
    config = EvalConfig(
        images=folder, out=out, cache_dir=tmp_path / "cache", epochs=2, max_steps=2
    )
    for variant in ("sim", "nosim"):
        run = run_config(config, 32, variant)
        assert ensure_run(run, retrain=False, train=False) == run.out / "best.pt"
    with pytest.raises(FileNotFoundError):  # other settings: would need training
        ensure_run(replace(run, epochs=3), retrain=False, train=False)
