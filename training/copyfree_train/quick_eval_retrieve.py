"""Reproducible retrieval evaluation: prints the mAP table for trained TBH checkpoints
against LSH / PCA-sign baselines on the same backbone features, and the effect of each
fine tie-break variant.

Uses the checkpoint's own split (split_records with its split_seed) and the cached
backbone features, so it takes seconds once features exist. Numbers are on the *test*
queries (never used for early stopping). Script, so it prints.

    python -m copyfree_train.quick_eval_retrieve RUN_DIR/best.pt [OTHER/best.pt ...] \\
        --cache-dir artifacts/retrieve/features [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from copyfree_train.tbh import RetrievalHead
from copyfree_train.train_retrieve import (
    RetrieveTrainConfig,
    cosine_metrics,
    evaluate_head,
    fit_fine,
    head_outputs,
    load_checkpoint,
    load_split,
    lsh_metrics,
    ranking_distance,
    ranking_metrics,
    scored,
)

FINE_VARIANTS = (("logits", 0), ("pca", 16), ("pca", 32), ("pca", 64))


def variant_name(state: dict[str, Any], head: RetrievalHead) -> str:
    return f"{state['fine']['kind']}-{head.fine_dim} int8 cosine, no code"


def pca_sign_metrics(split: Any, queries: np.ndarray, bits: int, k: int) -> dict:
    """PCA-hashing baseline (sign of the top-`bits` principal components)."""
    feats = split.features
    mean = feats[split.database].mean(axis=0)
    _, _, vt = np.linalg.svd(feats[split.database] - mean, full_matrices=False)
    proj = vt[:bits].T
    qb = ((feats[queries] - mean) @ proj > 0).astype(np.uint8)
    db = ((feats[split.database] - mean) @ proj > 0).astype(np.uint8)
    labels = split.labels
    return ranking_metrics(
        ranking_distance(qb, db), labels[queries], labels[split.database], k
    )


def evaluate(
    checkpoints: list[Path],
    images: Path | None = None,
    cache_dir: Path | None = None,
    k: int = 100,
) -> dict[str, Any]:
    torch.set_num_threads(1)
    results: dict[str, Any] = {"k": k, "models": {}, "baselines": {}, "fine": {}}
    split = None
    queries = None
    fine_alone_done = False
    for ckpt in checkpoints:
        model, head, state = load_checkpoint(ckpt)
        config = RetrieveTrainConfig.from_dict(state["config"])
        overrides = {}
        if images is not None:
            overrides["images"] = str(images)
        if cache_dir is not None:
            overrides["cache_dir"] = str(cache_dir)
        config = RetrieveTrainConfig.from_dict({**config.to_dict(), **overrides})
        if split is None:
            split = load_split(config)
            queries = scored(split.query, split.labels)
            results["queries"] = len(queries)
            results["database"] = len(split.database)
        name = f"TBH{config.bits}" + ("+sim" if config.similarity_loss else " (no sim)")
        ev = evaluate_head(head, split, queries, k, config.precision_n)
        results["models"][name] = {
            "checkpoint": str(ckpt),
            "bits": config.bits,
            "fine": f"{state['fine']['kind']}-{head.fine_dim}",
            **ev,
        }
        variants = {}
        for kind, dim in FINE_VARIANTS:
            proj, scale = fit_fine(model, split.features[split.database], kind, dim)
            variant = RetrievalHead(model, kind, proj, scale)
            label = f"{kind}-{variant.fine_dim}"
            variants[label] = evaluate_head(variant, split, queries, k, 10)[
                "hamming+fine"
            ]
        results["fine"][name] = variants
        if not fine_alone_done:
            # Reference: rank by the stored int8 fine vector alone (no code at all).
            _, qf = head_outputs(head, split.features[queries])
            _, dfine = head_outputs(head, split.features[split.database])
            q8, d8 = np.round(qf * 127.0), np.round(dfine * 127.0)
            qn = q8 / np.linalg.norm(q8, axis=1, keepdims=True)
            dn = d8 / np.linalg.norm(d8, axis=1, keepdims=True)
            labels = split.labels
            results["baselines"][f"fine vector alone ({variant_name(state, head)})"] = (
                ranking_metrics(
                    1.0 - qn @ dn.T, labels[queries], labels[split.database], k
                )
            )
            fine_alone_done = True
        for bits in {config.bits}:
            results["baselines"][f"LSH{bits}"] = lsh_metrics(
                split, queries, bits, k, 10
            )
            results["baselines"][f"PCA-sign{bits}"] = pca_sign_metrics(
                split, queries, bits, k
            )
    assert split is not None and queries is not None
    results["baselines"]["float cosine (1280-d)"] = cosine_metrics(
        split, queries, k, 10
    )
    # The same baselines on the validation queries, for the curves' reference lines.
    val = scored(split.val, split.labels)
    mk = f"mAP@{k}"
    bits = next(iter(results["models"].values()))["bits"]
    results["val_baselines"] = {
        f"LSH{bits} (val)": lsh_metrics(split, val, bits, k, 10)[mk],
        f"PCA-sign{bits} (val)": pca_sign_metrics(split, val, bits, k)[mk],
    }
    return results


def print_table(results: dict[str, Any]) -> None:
    k = results["k"]
    mk = f"mAP@{k}"
    print(
        f"test queries: {results['queries']}, database: {results['database']}, "
        f"relevance = same label"
    )
    print(f"| method | {mk} | P@10 | {mk} fine tie-break | P@10 fine |")
    print("|---|---:|---:|---:|---:|")
    for name, r in results["models"].items():
        h, f = r["hamming"], r["hamming+fine"]
        print(
            f"| {name} (fine {r['fine']}) | {h[mk]:.4f} | {h['P@10']:.4f} "
            f"| {f[mk]:.4f} | {f['P@10']:.4f} |"
        )
    for name, r in results["baselines"].items():
        print(f"| {name} | {r[mk]:.4f} | {r['P@10']:.4f} | - | - |")
    print()
    print(f"fine tie-break variants ({mk}, int8-quantised):")
    for name, variants in results["fine"].items():
        plain = results["models"][name]["hamming"][mk]
        cells = ", ".join(f"{v}: {m[mk]:.4f}" for v, m in variants.items())
        print(f"  {name}: none: {plain:.4f}, {cells}")


def plot_curves(
    results: dict[str, Any], path: Path, val_baselines: dict[str, float]
) -> None:
    """Training curves of every evaluated run (history.csv next to its checkpoint):
    reconstruction, similarity loss (logged even when it is off), validation mAP."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("recon", "reconstruction MSE (normalised features)"),
        ("similarity", "similarity loss (adjacency MSE)"),
        ("val_map", f"validation mAP@{results['k']} (Hamming, no tie-break)"),
    )
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for name, r in results["models"].items():
        history = Path(r["checkpoint"]).parent / "history.csv"
        if not history.is_file():
            continue
        with history.open() as f:
            rows = list(csv.DictReader(f))
        epochs = [int(row["epoch"]) for row in rows]
        for ax, (key, _) in zip(axes, panels, strict=True):
            values = [float(row[key]) if row.get(key) else np.nan for row in rows]
            ax.plot(epochs, values, lw=1.4, label=name)
    for label, value in val_baselines.items():
        axes[2].axhline(value, ls="--", lw=1, color="grey")
        axes[2].text(1, value, f" {label}", fontsize=7, va="bottom", color="grey")
    for ax, (_, title) in zip(axes, panels, strict=True):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")  # sim-on and sim-off differ by orders of magnitude
    axes[2].legend(fontsize=8)
    fig.suptitle(
        "retrieval TBH on EfficientNet-Lite0 features (dev corpus)", fontsize=10
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Print the retrieval mAP table.")
    p.add_argument("checkpoints", type=Path, nargs="+")
    p.add_argument("--images", type=Path, default=None)
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--curves", type=Path, default=None, help="write a curves PNG here")
    args = p.parse_args(argv)
    results = evaluate(args.checkpoints, args.images, args.cache_dir, args.k)
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.curves:
        plot_curves(results, args.curves, results["val_baselines"])
        print(f"curves: {args.curves}")


if __name__ == "__main__":
    main()
