"""`copyfree eval retrieve`: the retrieval report of issue 4, end to end.

Owns: the run presets (TBH + similarity loss; TBH without it, the ablation, with its
own tuned settings), training whatever run is missing or stale, and one side-by-side
evaluation at each bit length of TBH + sim, TBH (ablation), LSH, ITQ and PCA-sign on the
same backbone features, and pHash (imagehash) on the images; plus the convergence table
(time to best validation mAP with and without the loss), curves, t-SNE of the codes
(seed 001 Figure 6) and retrieval example grids (seed 001 Appendix A).

Protocol (seed 001 §4.2, CIFAR-10 I style; see copyfree_train.train_retrieve): test
queries are never trained on nor selected on; the database is the training set;
relevance = same manifest label; queries labelled "unsorted" are not scored.
Rankings: Hamming ascending, ties in a fixed random database order ("Hamming"), or ties
re-ranked by the int8 fine vector the bundle emits ("+fine", TBH only: what the index
serves). mAP@k is the deep-hashing convention of train_retrieve.ranking_metrics.

    copyfree eval retrieve --images ../shared/datasets/dev \\
        --out artifacts/retrieve/eval --figures docs/img

Writes into --out: runs/tbh{B}-{sim,nosim}/ (checkpoints, histories), report.json,
report.md, and the PNGs (copied to --figures as retrieve-*.png when given).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from copyfree_train.hash_baselines import (
    fit_itq,
    fit_lsh,
    fit_pca_sign,
    phash_codes,
)
from copyfree_train.train_retrieve import (
    CHECKPOINT_FILE,
    HISTORY_FILE,
    METRICS_FILE,
    RetrievalSplit,
    RetrieveTrainConfig,
    head_outputs,
    load_checkpoint,
    load_split,
    ranking_distance,
    scored,
    train_retrieval,
)
from copyfree_train.tsne import tsne

log = logging.getLogger(__name__)

DEFAULT_OUT = Path("artifacts/retrieve/eval")
DEFAULT_CACHE = Path("artifacts/retrieve/features")
VARIANTS = ("sim", "nosim")
# The ablation's settings, chosen on validation mAP at 16 bits (docs/models.md lists
# every setting tried). The TBH paper's own graph (power 1.4, batch 256) mixes every
# item with the whole batch, so reconstruction never beats the mean on these features.
NOSIM_PRESET: dict[str, Any] = {"similarity_loss": False}
SIM_PRESET: dict[str, Any] = {"similarity_loss": True}
# Settings that do not change what a run computes, ignored when deciding reuse.
_VOLATILE = ("out", "progress", "threads", "cache_dir", "images")


@dataclass(frozen=True)
class EvalConfig:
    images: Path
    out: Path = DEFAULT_OUT
    bits: tuple[int, ...] = (16, 32, 64)
    cache_dir: Path = DEFAULT_CACHE
    backbone: str = "efficientnet_lite0"
    backbone_checkpoint: Path | None = None
    ks: tuple[int, ...] = (100, 1000)
    precision_ns: tuple[int, ...] = (10, 100)
    lsh_seeds: int = 5
    retrain: bool = False
    train: bool = True  # False: evaluate existing runs only, fail if one is missing
    epochs: int | None = None  # override both presets (smoke runs, tests)
    max_steps: int | None = None
    limit: int | None = None
    figures: Path | None = None
    tsne_labels: int = 10
    tsne_per_label: int = 50
    example_queries: int = 8
    seed: int = 0
    threads: int = 1
    progress: bool = True


def run_config(config: EvalConfig, bits: int, variant: str) -> RetrieveTrainConfig:
    """The training config of one run of the report."""
    preset = SIM_PRESET if variant == "sim" else NOSIM_PRESET
    base = RetrieveTrainConfig(
        images=config.images,
        out=Path(config.out) / "runs" / f"tbh{bits}-{variant}",
        bits=bits,
        backbone=config.backbone,
        backbone_checkpoint=config.backbone_checkpoint,
        cache_dir=config.cache_dir,
        limit=config.limit,
        max_steps=config.max_steps,
        seed=config.seed,
        threads=config.threads,
        progress=config.progress,
    )
    extra: dict[str, Any] = dict(preset)
    if config.epochs is not None:
        extra["epochs"] = config.epochs
    return replace(base, **extra)


def _same_run(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Same computation: equal settings, a missing key meaning its default (runs saved
    before the setting existed), similarity settings ignored when the loss is off."""
    defaults = RetrieveTrainConfig(images=Path("."), out=Path(".")).to_dict()
    keys = (set(a) | set(b)) - set(_VOLATILE)
    if not a.get("similarity_loss", True) and not b.get("similarity_loss", True):
        keys = {k for k in keys if not k.startswith("similarity_")}
    return all(a.get(k, defaults.get(k)) == b.get(k, defaults.get(k)) for k in keys)


def ensure_run(run: RetrieveTrainConfig, retrain: bool, train: bool) -> Path:
    """Checkpoint of a finished run with exactly this config, training it if needed."""
    out = Path(run.out)
    ckpt, metrics = out / CHECKPOINT_FILE, out / METRICS_FILE
    if not retrain and ckpt.is_file() and metrics.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if "fine" in state and _same_run(state["config"], run.to_dict()):
            log.info("reusing %s", out)
            return ckpt
        log.info("%s was trained with other settings: retraining", out)
    if not train:
        raise FileNotFoundError(f"no finished run with this config in {out}")
    log.info("training %s", out)
    return train_retrieval(run).checkpoint


# --------------------------------------------------------------------------------------
# Metrics


def ranking_report(
    distance: np.ndarray,
    q_labels: np.ndarray,
    db_labels: np.ndarray,
    ks: tuple[int, ...],
    ns: tuple[int, ...],
) -> dict[str, float]:
    """mAP@k for each k and P@N for each N from one (nq, ndb) distance matrix
    (ascending = closer, ties in database order: stable sort). Same conventions as
    train_retrieve.ranking_metrics."""
    depth = min(max(ks + ns), distance.shape[1])
    order = np.argsort(distance, axis=1, kind="stable")[:, :depth]
    rel = (np.asarray(db_labels)[order] == np.asarray(q_labels)[:, None]).astype(
        np.float64
    )
    out: dict[str, float] = {}
    ranks = np.arange(1, depth + 1)
    for k in ks:
        kk = min(k, depth)
        r = rel[:, :kk]
        prec = np.cumsum(r, axis=1) / ranks[:kk]
        hits = r.sum(axis=1)
        ap = np.divide(
            (prec * r).sum(axis=1), hits, out=np.zeros_like(hits), where=hits > 0
        )
        out[f"mAP@{k}"] = float(ap.mean()) if len(ap) else 0.0
    for n in ns:
        out[f"P@{n}"] = float(rel[:, : min(n, depth)].mean()) if len(rel) else 0.0
    return out


def _mean_reports(reports: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in reports])) for k in reports[0]}


@dataclass
class Codes:
    """One method's codes for the test queries and the database."""

    query: np.ndarray
    database: np.ndarray
    q_fine: np.ndarray | None = None
    db_fine: np.ndarray | None = None


def tbh_codes(checkpoint: Path, split: RetrievalSplit, queries: np.ndarray) -> Codes:
    _, head, _ = load_checkpoint(checkpoint)
    qb, qf = head_outputs(head, split.features[queries])
    db, dfine = head_outputs(head, split.features[split.database])
    # int8, exactly as the index holds the fine vector
    return Codes(qb, db, np.round(qf * 127.0), np.round(dfine * 127.0))


def _history(run_dir: Path) -> list[dict[str, float]]:
    path = run_dir / HISTORY_FILE
    if not path.is_file():
        return []
    with path.open() as f:
        return [
            {k: float(v) for k, v in row.items() if v not in ("", None)}
            for row in csv.DictReader(f)
        ]


def convergence(
    history: list[dict[str, float]], reference: float | None
) -> dict[str, Any]:
    """Best validation mAP and when it was reached; when `reference` is given (the
    other variant's best), also the first evaluation at or above it."""
    rows = [r for r in history if "val_map" in r and not np.isnan(r["val_map"])]
    if not rows:
        return {}
    best = max(rows, key=lambda r: r["val_map"])
    first_best = next(r for r in rows if r["val_map"] == best["val_map"])
    near = next(r for r in rows if r["val_map"] >= 0.95 * best["val_map"])
    out: dict[str, Any] = {
        "initial_val_map": rows[0]["val_map"],
        "best_val_map": best["val_map"],
        "best_step": int(first_best["step"]),
        "best_seconds": first_best.get("train_seconds", float("nan")),
        "best_cpu_seconds": first_best.get("train_cpu_seconds", float("nan")),
        "step_95pct": int(near["step"]),
        "seconds_95pct": near.get("train_seconds", float("nan")),
        "cpu_seconds_95pct": near.get("train_cpu_seconds", float("nan")),
        "steps_run": int(rows[-1]["step"]),
    }
    if reference is not None:
        reach = next((r for r in rows if r["val_map"] >= reference), None)
        out["reference_val_map"] = reference
        out["step_to_reference"] = None if reach is None else int(reach["step"])
        out["seconds_to_reference"] = (
            None if reach is None else reach.get("train_seconds")
        )
        out["cpu_seconds_to_reference"] = (
            None if reach is None else reach.get("train_cpu_seconds")
        )
    return out


# --------------------------------------------------------------------------------------
# The report


def evaluate(config: EvalConfig) -> dict[str, Any]:
    """Train what is missing, evaluate every method, draw the figures; returns the
    report dict (also written to out/report.json and out/report.md)."""
    torch.set_num_threads(config.threads)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    runs: dict[tuple[int, str], Path] = {}
    for bits in config.bits:
        for variant in VARIANTS:
            runs[bits, variant] = ensure_run(
                run_config(config, bits, variant), config.retrain, config.train
            )

    split = load_split(run_config(config, config.bits[0], "sim"))
    labels = split.labels
    queries = scored(split.query, labels)
    q_labels, db_labels = labels[queries], labels[split.database]
    feats = split.features
    db_feats = feats[split.database]
    ks, ns = config.ks, config.precision_ns

    def report(codes: Codes, fine: bool = False) -> dict[str, float]:
        dist = ranking_distance(
            codes.query,
            codes.database,
            codes.q_fine if fine else None,
            codes.db_fine if fine else None,
        )
        return ranking_report(dist, q_labels, db_labels, ks, ns)

    methods: dict[str, dict[str, dict[str, float]]] = {}
    tbh: dict[tuple[int, str], Codes] = {}
    for bits in config.bits:
        row: dict[str, dict[str, float]] = {}
        for variant in VARIANTS:
            codes = tbh_codes(runs[bits, variant], split, queries)
            tbh[bits, variant] = codes
            name = "TBH+sim" if variant == "sim" else "TBH (no sim)"
            row[name] = report(codes)
            row[name + " +fine"] = report(codes, fine=True)
        row["LSH"] = _mean_reports(
            [
                report(Codes(h(feats[queries]), h(db_feats)))
                for h in (
                    fit_lsh(db_feats, bits, seed) for seed in range(config.lsh_seeds)
                )
            ]
        )
        itq = fit_itq(db_feats, bits, seed=config.seed)
        row["ITQ"] = report(Codes(itq(feats[queries]), itq(db_feats)))
        pca = fit_pca_sign(db_feats, bits)
        row["PCA-sign"] = report(Codes(pca(feats[queries]), pca(db_feats)))
        ph = phash_codes(
            split.records, bits, config.cache_dir, progress=config.progress
        )
        row["pHash"] = report(Codes(ph[queries], ph[split.database]))
        methods[str(bits)] = row

    mean = db_feats.mean(axis=0)
    qn = feats[queries] - mean
    dn = db_feats - mean
    qn /= np.linalg.norm(qn, axis=1, keepdims=True)
    dn /= np.linalg.norm(dn, axis=1, keepdims=True)
    float_cosine = ranking_report(1.0 - qn @ dn.T, q_labels, db_labels, ks, ns)

    conv: dict[str, dict[str, Any]] = {}
    for bits in config.bits:
        hist = {v: _history(runs[bits, v].parent) for v in VARIANTS}
        nosim = convergence(hist["nosim"], None)
        conv[str(bits)] = {
            "sim": convergence(hist["sim"], nosim.get("best_val_map")),
            "nosim": nosim,
        }
    mk = f"mAP@{ks[0]}"
    targets = {
        str(bits): {
            "sim_minus_lsh": methods[str(bits)]["TBH+sim"][mk]
            - methods[str(bits)]["LSH"][mk],
            "sim_minus_nosim": methods[str(bits)]["TBH+sim"][mk]
            - methods[str(bits)]["TBH (no sim)"][mk],
        }
        for bits in config.bits
    }
    for t in targets.values():
        t["met"] = bool(t["sim_minus_lsh"] >= 0.05 and t["sim_minus_nosim"] > 0)
    run_settings = {
        f"tbh{b}-{v}": json.loads((runs[b, v].parent / "config.json").read_text())
        for b, v in runs
    }
    result: dict[str, Any] = {
        "images": str(config.images),
        "backbone": config.backbone,
        "backbone_weights": split.backbone_weights,
        "n_images": len(split.records),
        "n_database": len(split.database),
        "n_test_queries": len(queries),
        "n_val_queries": len(scored(split.val, labels)),
        "primary_metric": mk,
        "methods": methods,
        "float_cosine": float_cosine,
        "convergence": conv,
        "targets": targets,
        "runs": {f"tbh{b}-{v}": str(p) for (b, v), p in runs.items()},
        "run_settings": run_settings,
    }

    figures = [
        plot_curves(runs, config.bits, out / "retrieve-curves.png"),
        plot_map_by_bits(methods, float_cosine, mk, out / "retrieve-map.png"),
        plot_tsne(tbh, split, config, out / "retrieve-tsne.png"),
    ]
    for bits in (config.bits[0], config.bits[-1]):
        figures.append(
            plot_examples(
                tbh[bits, "sim"],
                split,
                queries,
                config.example_queries,
                f"TBH+sim {bits} bits, ties by the fine vector",
                out / f"retrieve-examples-tbh{bits}.png",
            )
        )
    result["figures"] = [str(f) for f in figures]
    result["eval_seconds"] = round(time.perf_counter() - started, 1)
    (out / "report.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "report.md").write_text(render_markdown(result))
    if config.figures is not None:
        Path(config.figures).mkdir(parents=True, exist_ok=True)
        for f in figures:
            shutil.copyfile(f, Path(config.figures) / f.name)
    return result


def render_markdown(result: dict[str, Any]) -> str:
    """The tables for docs/models.md."""
    mk = result["primary_metric"]
    metrics = list(next(iter(next(iter(result["methods"].values())).values())))
    lines = [
        f"Test queries {result['n_test_queries']}, database {result['n_database']} "
        f"(= training set), backbone {result['backbone']}. Relevance = same label.",
        "",
        "| bits | method | " + " | ".join(metrics) + " |",
        "|---:|---|" + "---:|" * len(metrics),
    ]
    for bits, row in result["methods"].items():
        for name, m in row.items():
            cells = " | ".join(f"{m[k]:.3f}" for k in metrics)
            lines.append(f"| {bits} | {name} | {cells} |")
    fc = result["float_cosine"]
    cells = " | ".join(f"{fc[k]:.3f}" for k in metrics)
    lines.append(f"| float | cosine of the backbone features | {cells} |")
    lines += [
        "",
        f"Targets ({mk}): TBH+sim - LSH >= 0.05 and TBH+sim > TBH (no sim).",
        "",
        "| bits | TBH+sim - LSH | TBH+sim - TBH (no sim) | met |",
        "|---:|---:|---:|---|",
    ]
    for bits, t in result["targets"].items():
        lines.append(
            f"| {bits} | {t['sim_minus_lsh']:+.3f} | {t['sim_minus_nosim']:+.3f} "
            f"| {'yes' if t['met'] else 'NO'} |"
        )
    lines += [
        "",
        "Convergence (validation mAP@100; CPU seconds of optimisation only, 1 thread,"
        " evaluation excluded; 13 steps = 1 epoch at batch 256):",
        "",
        "| bits | variant | start | best | step at best | CPU s at best | "
        "step at 95% of best | CPU s at 95% | steps run | "
        "step (CPU s) sim reaches no-sim's best |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for bits, c in result["convergence"].items():
        for variant in VARIANTS:
            v = c[variant]
            if not v:
                continue
            reach = ""
            if "reference_val_map" in v:
                step = v["step_to_reference"]
                reach = (
                    "never"
                    if step is None
                    else f"{step} ({v['cpu_seconds_to_reference']:.0f} s)"
                )
            lines.append(
                f"| {bits} | {variant} | {v['initial_val_map']:.3f} "
                f"| {v['best_val_map']:.3f} | {v['best_step']} "
                f"| {v['best_cpu_seconds']:.0f} | {v['step_95pct']} "
                f"| {v['cpu_seconds_95pct']:.0f} | {v['steps_run']} | {reach} |"
            )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# Figures


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(
    runs: dict[tuple[int, str], Path], bits_list: tuple[int, ...], path: Path
) -> Path:
    """Per bit length: validation mAP and reconstruction loss against steps, with and
    without the similarity loss."""
    plt = _plt()
    fig, axes = plt.subplots(
        2, len(bits_list), figsize=(4.6 * len(bits_list), 6.4), squeeze=False
    )
    colours = {"sim": "tab:red", "nosim": "tab:blue"}
    names = {"sim": "TBH + similarity loss", "nosim": "TBH (no similarity loss)"}
    for col, bits in enumerate(bits_list):
        for variant in VARIANTS:
            hist = _history(runs[bits, variant].parent)
            steps = np.array([r.get("step", np.nan) for r in hist])
            for row, key in enumerate(("val_map", "recon")):
                values = np.array([r.get(key, np.nan) for r in hist])
                ok = ~np.isnan(values)
                axes[row, col].plot(
                    steps[ok], values[ok], lw=1.3, color=colours[variant],
                    label=names[variant],
                )  # fmt: skip
        axes[0, col].set_title(f"{bits} bits: validation mAP@100", fontsize=9)
        axes[1, col].set_title(f"{bits} bits: reconstruction MSE", fontsize=9)
        for row in range(2):
            axes[row, col].set_xlabel("optimisation step")
            axes[row, col].grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_map_by_bits(
    methods: dict[str, dict[str, dict[str, float]]],
    float_cosine: dict[str, float],
    metric: str,
    path: Path,
) -> Path:
    plt = _plt()
    bits = [int(b) for b in methods]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    names = list(next(iter(methods.values())))
    for name in names:
        ax.plot(
            bits, [methods[str(b)][name][metric] for b in bits], marker="o",
            lw=1.4, ls="--" if "+fine" in name else "-", label=name,
        )  # fmt: skip
    ax.axhline(float_cosine[metric], color="grey", ls=":", label="float cosine")
    ax.set_xscale("log", base=2)
    ax.set_xticks(bits, [str(b) for b in bits])
    ax.set_xlabel("bits")
    ax.set_ylabel(f"test {metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def tsne_sample(
    split: RetrievalSplit, n_labels: int, per_label: int, seed: int
) -> np.ndarray:
    """Database indices (positions in split.database) of up to `per_label` items of
    each of the `n_labels` most frequent scored labels."""
    db_labels = split.labels[split.database]
    values, counts = np.unique(
        [x for x in db_labels if x not in ("", "unsorted")], return_counts=True
    )
    top = values[np.argsort(-counts, kind="stable")[:n_labels]]
    rng = np.random.default_rng(seed)
    chosen = []
    for label in top:
        idx = np.flatnonzero(db_labels == label)
        chosen.append(np.sort(rng.permutation(idx)[:per_label]))
    return np.concatenate(chosen)


def plot_tsne(
    tbh: dict[tuple[int, str], Codes],
    split: RetrievalSplit,
    config: EvalConfig,
    path: Path,
) -> Path:
    """t-SNE of database codes (Hamming distances), coloured by label: rows = with /
    without the similarity loss, columns = bit lengths (seed 001 Figure 6)."""
    plt = _plt()
    sample = tsne_sample(split, config.tsne_labels, config.tsne_per_label, config.seed)
    labels = split.labels[split.database][sample]
    uniq = list(dict.fromkeys(labels))
    cmap = plt.get_cmap("tab10" if len(uniq) <= 10 else "tab20")
    colour = np.array([uniq.index(x) for x in labels])
    bits_list = config.bits
    fig, axes = plt.subplots(
        2, len(bits_list), figsize=(4.2 * len(bits_list), 8.0), squeeze=False
    )
    for col, bits in enumerate(bits_list):
        for row, variant in enumerate(VARIANTS):
            codes = tbh[bits, variant].database[sample].astype(np.float64)
            ham = codes @ (1 - codes).T + (1 - codes) @ codes.T
            y = tsne(ham, perplexity=30.0, seed=config.seed)
            ax = axes[row, col]
            ax.scatter(
                y[:, 0], y[:, 1], c=colour, cmap=cmap, vmin=0,
                vmax=max(cmap.N - 1, 1), s=7,
            )  # fmt: skip
            name = "TBH+sim" if variant == "sim" else "TBH (no sim)"
            ax.set_title(f"{name}, {bits} bits", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    handles = [
        plt.Line2D([], [], ls="", marker="o", color=cmap(i), label=u)
        for i, u in enumerate(uniq)
    ]
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def example_queries(
    split: RetrievalSplit, queries: np.ndarray, n: int, seed: int
) -> np.ndarray:
    """Positions in `queries` of n test queries with n different labels (random,
    fixed seed), so the grid shows several subjects."""
    labels = split.labels[queries]
    order = np.random.default_rng(seed).permutation(len(queries))
    chosen, seen = [], set()
    for i in order:
        if labels[i] not in seen:
            seen.add(labels[i])
            chosen.append(i)
        if len(chosen) == n:
            break
    return np.array(chosen, dtype=np.int64)


def plot_examples(
    codes: Codes,
    split: RetrievalSplit,
    queries: np.ndarray,
    n_queries: int,
    title: str,
    path: Path,
    top: int = 10,
    thumb: int = 80,
) -> Path:
    """Grid: per row a query (blue border) and its top-10 database results, green
    border = same label, red = different (seed 001 Appendix A)."""
    from PIL import Image, ImageDraw, ImageOps

    from copyfree_train.data import load_rgb

    rows = example_queries(split, queries, n_queries, 0)
    dist = ranking_distance(
        codes.query[rows], codes.database, codes.q_fine[rows], codes.db_fine
    )
    order = np.argsort(dist, axis=1, kind="stable")[:, :top]
    labels = split.labels
    pad, caption, border = 4, 14, 4
    cell_w, cell_h = thumb + pad, thumb + caption + pad
    canvas = Image.new(
        "RGB", (cell_w * (top + 1) + pad, cell_h * len(rows) + 24 + pad), "white"
    )
    draw = ImageDraw.Draw(canvas)
    draw.text(
        (pad, 6), title + "  (blue: query; green: same label; red: other)", "black"
    )

    def cell(record_index: int, colour: str, x: int, y: int, text: str) -> None:
        im = load_rgb(split.records[record_index].path)
        im = ImageOps.pad(im, (thumb - 2 * border, thumb - 2 * border), color="white")
        box = Image.new("RGB", (thumb, thumb), colour)
        box.paste(im, (border, border))
        canvas.paste(box, (x, y))
        draw.text((x, y + thumb + 1), text[:14], "black")

    for r, qi in enumerate(rows):
        y = 24 + r * cell_h
        q_record = queries[qi]
        cell(q_record, "#1f5fbf", pad, y, labels[q_record].split("/")[-1])
        for c, di in enumerate(order[r]):
            rec = split.database[di]
            same = labels[rec] == labels[q_record]
            cell(
                rec, "#2ca02c" if same else "#d62728", pad + (c + 1) * cell_w, y,
                labels[rec].split("/")[-1],
            )  # fmt: skip
    canvas.save(path, optimize=True)
    return path


# --------------------------------------------------------------------------------------
# Command line


def _int_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="copyfree eval retrieve",
        description="Retrieval report: TBH+sim vs TBH vs LSH/ITQ/pHash by bit length.",
    )
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--bits", type=_int_tuple, default=(16, 32, 64))
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--backbone-checkpoint", type=Path, default=None)
    p.add_argument("--k", type=_int_tuple, default=(100, 1000), help="mAP@k, k,k")
    p.add_argument("--precision-n", type=_int_tuple, default=(10, 100))
    p.add_argument("--retrain", action="store_true", help="retrain every run")
    p.add_argument(
        "--no-train", action="store_true", help="only evaluate existing runs"
    )
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--figures", type=Path, default=None, help="copy PNGs here")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    config = EvalConfig(
        images=args.images,
        out=args.out,
        bits=args.bits,
        cache_dir=args.cache_dir,
        backbone=args.backbone,
        backbone_checkpoint=args.backbone_checkpoint,
        ks=args.k,
        precision_ns=args.precision_n,
        retrain=args.retrain,
        train=not args.no_train,
        epochs=args.epochs,
        max_steps=args.max_steps,
        limit=args.limit,
        figures=args.figures,
        threads=args.threads,
        progress=not args.quiet,
    )
    result = evaluate(config)
    log.info("report: %s", Path(config.out) / "report.md")
    log.info("targets: %s", json.dumps(result["targets"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
