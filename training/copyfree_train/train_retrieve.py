"""Trainer and evaluation for the retrieval model: TBH hashing head on cached backbone
features (copyfree_train.tbh, copyfree_train.backbone).

Owns: RetrieveTrainConfig, the data split (validation queries / test queries /
database, split_records with a fixed seed; the head trains on the database only),
train_retrieval (Adam + cosine decay, actor/critic alternation, per-epoch validation
mAP, best-mAP checkpoint with early stopping, loss/mAP CSV + PNG), the mAP@k /
precision@N evaluation with Hamming ranking (optionally tie-broken by the fine vector),
the sign-of-random-projection LSH baseline, and fitting the fine projection.

Split (seed 001 §4.2, the CIFAR-10 I / NUS-WIDE protocol): a fixed-seed random split
into validation queries (early stopping only), test queries (the reported numbers,
never trained or selected on) and the database, which is also the training set.

Evaluation conventions: relevance = same label (manifest.csv); queries labelled
"unsorted" or "" are not scored (they stay in the database as distractors, never
relevant). Ranking = Hamming ascending; without a fine vector ties keep database order,
which is a fixed-seed random permutation (record order is sorted by id, and ids carry
their source package, which correlates with labels: id order would bias every tie);
with one, ties are ordered by cosine of the fine vectors, descending. AP@k = sum over
relevant ranks i <= k of precision@i, divided by the number of relevant items within
the top k (the usual deep-hashing convention; 0 when none is retrieved).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from copyfree_train.backbone import build_backbone, extract_features, records_hash
from copyfree_train.data import ImageRecord, scan_folder, split_records
from copyfree_train.tbh import (
    TBH,
    LossWeights,
    RetrievalHead,
    TBHConfig,
    actor_loss,
    critic_loss,
)

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "best.pt"
CONFIG_FILE = "config.json"
HISTORY_FILE = "history.csv"
CURVE_FILE = "curves.png"
METRICS_FILE = "metrics.json"
CHECKPOINT_FORMAT = "copyfree-retrieve-tbh/1"
UNSCORED_LABELS = frozenset({"", "unsorted"})
HISTORY_COLUMNS = (
    "epoch", "step", "lr", "actor", "recon", "adv_gen", "similarity", "critic",
    "val_map", "bit_balance", "seconds", "train_seconds", "train_cpu_seconds",
)  # fmt: skip


_PATH_FIELDS = ("images", "out", "cache_dir", "backbone_checkpoint")


@dataclass(frozen=True)
class RetrieveTrainConfig:
    images: Path
    out: Path
    bits: int = 16
    epochs: int = 60
    batch_size: int = 256
    lr: float = 1e-3
    lr_min: float = 1e-5  # cosine decay floor
    critic_lr: float = 1e-4
    seed: int = 0
    similarity_loss: bool = True
    # The similarity MSE is ~1e-3 against recon ~1; weights 30 and 300 reached the same
    # validation mAP@100 on the dev corpus (0.346 / 0.344), 300 more steadily.
    similarity_weight: float = 300.0
    similarity_power: float = 1.0  # both adjacencies ** p (tbh.similarity_loss)
    # Fraction of the steps over which the similarity weight decays linearly to 0
    # (0: constant weight). The loss as a warm start: it gives the codes the backbone's
    # neighbourhoods at once, then reconstruction through the graph refines them.
    similarity_decay: float = 0.0
    # The paper's recipe collapsed here (docs/models.md has the runs): with a mean
    # reconstruction error, adversarial weight 0.1 or even 0.001 made every item the
    # same code (the per-sample discriminators mode-collapse the codes), and graph power
    # 1.4 mixes each item with the whole batch. 0.001 and power 10 train.
    adversarial_weight: float = 0.001
    reconstruction_weight: float = 1.0
    adjacency_power: float = 10.0  # TBH graph (1 - hamming / B) ** p; authors': 1.4
    stochastic_codes: bool = True  # paper's stochastic neuron; False: logits > 0
    hidden_dim: int = 1024
    continuous_dim: int = 512
    limit: int | None = None  # max images scanned (before the split)
    max_steps: int | None = None  # cap on total optimisation steps (tests, smoke runs)
    backbone: str = "efficientnet_lite0"
    backbone_checkpoint: Path | None = None  # local weights file (vit_b16 needs one)
    cache_dir: Path | None = None  # feature cache; default out/features
    split_seed: int = 20261122
    val_fraction: float = 0.1  # queries for early stopping
    query_fraction: float = 0.1  # queries for the reported numbers (never selected on)
    map_k: int = 100
    precision_n: int = 10
    eval_every: int = 1  # epochs between validation mAP evaluations
    patience: int = 20  # evaluations without improvement before stopping
    fine_kind: str = "pca"  # "pca" (of backbone features) or "logits" (tanh, F = bits)
    fine_dim: int = 32  # for fine_kind "pca"
    threads: int = 1  # the head is small: a second thread only adds contention
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in _PATH_FIELDS:
            d[k] = None if d[k] is None else str(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RetrieveTrainConfig:
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        for k in _PATH_FIELDS:
            if kw.get(k) is not None:
                kw[k] = Path(kw[k])
        return cls(**kw)

    @property
    def feature_cache(self) -> Path:
        return (
            Path(self.cache_dir)
            if self.cache_dir is not None
            else Path(self.out) / "features"
        )


# --------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class RetrievalSplit:
    records: list[ImageRecord]
    features: np.ndarray  # (len(records), D), row order = records
    val: np.ndarray  # indices into records
    query: np.ndarray
    database: np.ndarray
    backbone_weights: str = ""

    @property
    def labels(self) -> np.ndarray:
        return np.array([r.label for r in self.records], dtype=object)


def load_split(config: RetrieveTrainConfig) -> RetrievalSplit:
    """Records, their (cached) backbone features and the deterministic 3-way split."""
    records = scan_folder(Path(config.images), limit=config.limit)
    backbone = build_backbone(config.backbone, config.backbone_checkpoint)
    features = extract_features(
        backbone, records, config.feature_cache, progress=config.progress
    )
    db_fraction = 1.0 - config.val_fraction - config.query_fraction
    val, query, db = split_records(
        records,
        [config.val_fraction, config.query_fraction, db_fraction],
        config.split_seed,
    )
    pos = {r.item_id: i for i, r in enumerate(records)}
    idx = [
        np.array([pos[r.item_id] for r in part], dtype=np.int64)
        for part in (val, query, db)
    ]
    # Database order = tie order of a plain Hamming ranking: random, not by id.
    idx[2] = idx[2][np.random.default_rng(config.split_seed + 1).permutation(len(db))]
    return RetrievalSplit(
        records, features, idx[0], idx[1], idx[2], backbone.weights_id()
    )


def scored(indices: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Query indices whose label can be scored (not unsorted / empty)."""
    return np.array(
        [i for i in indices if labels[i] not in UNSCORED_LABELS], dtype=np.int64
    )


# --------------------------------------------------------------------------------------
# Evaluation


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0)


def ranking_distance(
    q_bits: np.ndarray,
    db_bits: np.ndarray,
    q_fine: np.ndarray | None = None,
    db_fine: np.ndarray | None = None,
) -> np.ndarray:
    """(nq, ndb) sort key: Hamming distance, plus (1 - cos(fine)) / 4 in [0, 0.5] when
    a fine vector is given: it orders ties and never crosses to the next distance."""
    q = 2.0 * np.asarray(q_bits, dtype=np.float64) - 1.0
    d = 2.0 * np.asarray(db_bits, dtype=np.float64) - 1.0
    dist = 0.5 * (q.shape[1] - q @ d.T)
    if q_fine is not None and db_fine is not None:
        dist = dist + 0.25 * (1.0 - _unit(q_fine) @ _unit(db_fine).T)
    return dist


def ranking_metrics(
    distance: np.ndarray,
    q_labels: np.ndarray,
    db_labels: np.ndarray,
    k: int,
    precision_n: int = 10,
) -> dict[str, float]:
    """mAP@k and precision@N from an (nq, ndb) distance (ascending = closer; ties keep
    database order, via a stable sort)."""
    k = min(k, distance.shape[1])
    order = np.argsort(distance, axis=1, kind="stable")[:, :k]
    rel = (np.asarray(db_labels)[order] == np.asarray(q_labels)[:, None]).astype(
        np.float64
    )
    ranks = np.arange(1, k + 1)
    precision_at = np.cumsum(rel, axis=1) / ranks
    hits = rel.sum(axis=1)
    ap = np.divide(
        (precision_at * rel).sum(axis=1), hits, out=np.zeros_like(hits), where=hits > 0
    )
    n = min(precision_n, k)
    return {
        f"mAP@{k}": float(ap.mean()) if len(ap) else 0.0,
        f"P@{n}": float(rel[:, :n].mean()) if len(ap) else 0.0,
        "queries": len(ap),
    }


def lsh_bits(
    features: np.ndarray, mean: np.ndarray, bits: int, seed: int
) -> np.ndarray:
    """Sign of random Gaussian projections of mean-centred features (SimHash)."""
    rng = np.random.default_rng(seed)
    planes = rng.standard_normal((features.shape[1], bits))
    return ((features - mean) @ planes > 0).astype(np.uint8)


def lsh_metrics(
    split: RetrievalSplit,
    queries: np.ndarray,
    bits: int,
    k: int,
    precision_n: int,
    seeds: int = 5,
) -> dict[str, float]:
    """LSH baseline on the same features, averaged over `seeds` random projections."""
    labels = split.labels
    feats = split.features
    mean = feats[split.database].mean(axis=0)
    runs = []
    for s in range(seeds):
        qb = lsh_bits(feats[queries], mean, bits, s)
        db = lsh_bits(feats[split.database], mean, bits, s)
        runs.append(
            ranking_metrics(
                ranking_distance(qb, db),
                labels[queries],
                labels[split.database],
                k,
                precision_n,
            )
        )
    return {key: float(np.mean([r[key] for r in runs])) for key in runs[0]}


def cosine_metrics(
    split: RetrievalSplit, queries: np.ndarray, k: int, precision_n: int
) -> dict[str, float]:
    """Upper reference: rank by cosine of the centred float backbone features."""
    labels = split.labels
    mean = split.features[split.database].mean(axis=0)
    q = _unit(split.features[queries] - mean)
    d = _unit(split.features[split.database] - mean)
    return ranking_metrics(
        1.0 - q @ d.T, labels[queries], labels[split.database], k, precision_n
    )


@torch.no_grad()
def head_outputs(
    head: RetrievalHead, features: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(bits {0,1} (n,B), fine float (n,F)) from the inference head."""
    head.eval()
    logits, fine = head(torch.from_numpy(np.asarray(features, dtype=np.float32)))
    return (logits > 0).numpy().astype(np.uint8), fine.numpy()


@torch.no_grad()
def code_bits(model: TBH, features: np.ndarray) -> np.ndarray:
    model.eval()
    logits = model.code_logits(torch.from_numpy(np.asarray(features, dtype=np.float32)))
    return (logits > 0).numpy().astype(np.uint8)


def fit_fine(
    model: TBH, db_features: np.ndarray, kind: str, dim: int
) -> tuple[torch.Tensor, float]:
    """The fine tie-break vector's parameters: (projection (D, F), scale).

    kind "pca": top-`dim` principal directions of the normalised database features;
    scale = 99.9th percentile of |projection| so int8 clips only outliers.
    kind "logits": projection unused (shape (D, bits) of zeros, only its width counts),
    fine = tanh(logits / scale) with scale = median |logit|.
    """
    with torch.no_grad():
        xn = model.normalise(
            torch.from_numpy(np.asarray(db_features, dtype=np.float32))
        )
        if kind == "pca":
            xc = xn - xn.mean(dim=0)
            _, _, v = torch.linalg.svd(xc.double(), full_matrices=False)
            proj = v[:dim].t().float()  # (D, F)
            # Deterministic sign per direction (SVD signs are arbitrary).
            signs = torch.sign(
                proj[proj.abs().argmax(dim=0), torch.arange(proj.shape[1])]
            )
            proj = proj * signs
            values = (xn @ proj).abs().flatten()
            scale = float(torch.quantile(values, 0.999))
            return proj, scale
        if kind == "logits":
            logits = model.code_logits(
                torch.from_numpy(np.asarray(db_features, dtype=np.float32))
            )
            scale = float(logits.abs().median().clamp_min(1e-3))
            return torch.zeros(xn.shape[1], model.config.bits), scale
    raise ValueError(f"fine_kind must be 'pca' or 'logits', got {kind!r}")


def evaluate_head(
    head: RetrievalHead,
    split: RetrievalSplit,
    queries: np.ndarray,
    k: int,
    precision_n: int,
) -> dict[str, dict[str, float]]:
    """Hamming ranking with database-order ties and with fine tie-breaking, on int8-
    quantised fine vectors exactly as the index will hold them."""
    labels = split.labels
    qb, qf = head_outputs(head, split.features[queries])
    db, dfine = head_outputs(head, split.features[split.database])
    qf8, df8 = np.round(qf * 127.0), np.round(dfine * 127.0)
    plain = ranking_metrics(
        ranking_distance(qb, db),
        labels[queries],
        labels[split.database],
        k,
        precision_n,
    )
    tie = ranking_metrics(
        ranking_distance(qb, db, qf8, df8),
        labels[queries],
        labels[split.database],
        k,
        precision_n,
    )
    return {"hamming": plain, "hamming+fine": tie}


# --------------------------------------------------------------------------------------
# Training


def _cosine_lr(lr: float, lr_min: float, step: int, total: int) -> float:
    t = min(step / max(total, 1), 1.0)
    return lr_min + 0.5 * (lr - lr_min) * (1.0 + math.cos(math.pi * t))


def _val_map(model: TBH, split: RetrievalSplit, val: np.ndarray, k: int) -> float:
    labels = split.labels
    qb = code_bits(model, split.features[val])
    db = code_bits(model, split.features[split.database])
    m = ranking_metrics(
        ranking_distance(qb, db), labels[val], labels[split.database], k
    )
    return m[f"mAP@{min(k, len(split.database))}"]


def _save(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # atomic: an interrupted save never leaves a broken checkpoint


@dataclass(frozen=True)
class RetrieveResult:
    checkpoint: Path
    metrics: dict[str, Any]


def train_retrieval(config: RetrieveTrainConfig) -> RetrieveResult:
    """Train the TBH head, keep the best validation-mAP state, fit the fine vector, and
    evaluate on the test queries. Writes into config.out: best.pt, config.json,
    history.csv, curves.png, metrics.json."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(config.threads)
    (out / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    started = time.perf_counter()

    split = load_split(config)
    labels = split.labels
    val_q, test_q = scored(split.val, labels), scored(split.query, labels)
    if len(val_q) == 0 or len(test_q) == 0 or len(split.database) < 2:
        raise ValueError("not enough labelled images for a query/database split")
    db_feats = torch.from_numpy(split.features[split.database])
    log.info(
        "database %d, validation queries %d, test queries %d",
        len(split.database),
        len(val_q),
        len(test_q),
    )

    torch.manual_seed(config.seed)
    tbh_config = TBHConfig(
        feature_dim=split.features.shape[1], bits=config.bits,
        hidden_dim=config.hidden_dim, continuous_dim=config.continuous_dim,
        adjacency_power=config.adjacency_power,
    )  # fmt: skip
    model = TBH(tbh_config)
    model.fit_normalisation(db_feats)
    weights = LossWeights(
        adversarial=config.adversarial_weight,
        similarity=config.similarity_weight,
        use_similarity=config.similarity_loss,
        reconstruction=config.reconstruction_weight,
        similarity_power=config.similarity_power,
    )
    opt_actor = torch.optim.Adam(model.actor_parameters(), lr=config.lr)
    opt_critic = torch.optim.Adam(model.critic_parameters(), lr=config.critic_lr)

    n = len(split.database)
    batch = min(config.batch_size, n)
    steps_per_epoch = max(1, n // batch)  # full batches: the graph is built per batch
    total = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    epochs = math.ceil(total / steps_per_epoch)

    common = {
        "format": CHECKPOINT_FORMAT,
        "config": config.to_dict(),
        "tbh_config": tbh_config.to_dict(),
        "backbone": config.backbone,
        "backbone_checkpoint": (
            None
            if config.backbone_checkpoint is None
            else str(config.backbone_checkpoint)
        ),
        "backbone_weights": split.backbone_weights,
        "data": {
            "images": str(config.images),
            "files_hash": records_hash(split.records),
            "n_images": len(split.records),
            "n_database": n,
            "n_val_queries": len(val_q),
            "n_test_queries": len(test_q),
        },
    }
    history: list[dict[str, float]] = []
    best_map, best_epoch, stale, step = -1.0, 0, 0, 0
    best_at = {"step": 0, "train_seconds": 0.0, "train_cpu_seconds": 0.0}
    # Optimisation time only (evaluation excluded), wall and this process's CPU: the
    # machine is shared, and CPU time is the steadier of the two for "time to best".
    train_wall, train_cpu = 0.0, 0.0
    ckpt = out / CHECKPOINT_FILE
    # Epoch 0: the untrained model, so curves start where both variants start.
    initial_map = _val_map(model, split, val_q, config.map_k)
    history.append(
        {"epoch": 0, "step": 0, "val_map": initial_map, "seconds": 0.0,
         "train_seconds": 0.0, "train_cpu_seconds": 0.0}
    )  # fmt: skip
    bar = tqdm(
        total=total,
        desc=f"tbh{config.bits}",
        unit="step",
        disable=not config.progress,
        dynamic_ncols=True,
    )
    for epoch in range(1, epochs + 1):
        rng = np.random.default_rng([config.seed, epoch])
        order = rng.permutation(n)
        model.train()
        sums: dict[str, float] = {}
        count = 0
        for i in range(steps_per_epoch):
            if step >= total:
                break
            lr = _cosine_lr(config.lr, config.lr_min, step, total)
            for g in opt_actor.param_groups:
                g["lr"] = lr
            for g in opt_critic.param_groups:
                g["lr"] = config.critic_lr * lr / config.lr
            if config.similarity_decay > 0:
                left = max(0.0, 1.0 - step / (config.similarity_decay * total))
                weights = replace(weights, similarity=config.similarity_weight * left)
            xb = db_feats[order[i * batch : (i + 1) * batch]]
            t_wall, t_cpu = time.perf_counter(), time.process_time()
            # Actor step (encoder/decoder), then critic step on the same codes: the
            # usual alternation of adversarial auto-encoders.
            out_ = model(xb, stochastic=config.stochastic_codes)
            loss, parts = actor_loss(model, out_, weights)
            opt_actor.zero_grad(set_to_none=True)
            loss.backward()
            opt_actor.step()
            c_loss, c_value = critic_loss(model, out_)
            opt_critic.zero_grad(set_to_none=True)
            c_loss.backward()
            opt_critic.step()
            train_wall += time.perf_counter() - t_wall
            train_cpu += time.process_time() - t_cpu
            parts["critic"] = c_value
            for key, v in parts.items():
                sums[key] = sums.get(key, 0.0) + v
            count += 1
            step += 1
            bar.update(1)
        row: dict[str, float] = {k: v / max(count, 1) for k, v in sums.items()}
        row.update(
            epoch=epoch, step=step, lr=lr, seconds=time.perf_counter() - started,
            train_seconds=train_wall, train_cpu_seconds=train_cpu,
        )  # fmt: skip
        row["val_map"] = float("nan")
        if epoch % config.eval_every == 0 or step >= total:
            val_map = _val_map(model, split, val_q, config.map_k)
            row["val_map"] = val_map
            row["bit_balance"] = float(
                code_bits(model, split.features[split.database]).mean()
            )
            if val_map > best_map:
                best_map, best_epoch, stale = val_map, epoch, 0
                best_at = {
                    "step": step, "train_seconds": round(train_wall, 2),
                    "train_cpu_seconds": round(train_cpu, 2),
                }  # fmt: skip
                _save(
                    ckpt,
                    {
                        **common,
                        "state_dict": model.state_dict(),
                        "epoch": epoch,
                        "step": step,
                        "val_map": val_map,
                    },
                )
            else:
                stale += 1
            bar.set_postfix(
                recon=f"{row.get('recon', 0):.3f}",
                val_map=f"{val_map:.3f}",
                best=f"{best_map:.3f}",
            )
        history.append(row)
        write_history(history, out / HISTORY_FILE)  # every epoch: readable mid-run
        if epoch % 10 == 0:
            log.info(
                "epoch %d: recon %.4f, similarity %.4f, val mAP %.4f (best %.4f)",
                epoch,
                row.get("recon", float("nan")),
                row.get("similarity", float("nan")),
                row["val_map"],
                best_map,
            )
        if stale >= config.patience:
            log.info(
                "early stop at epoch %d (best %d, val mAP %.4f)",
                epoch,
                best_epoch,
                best_map,
            )
            break
        if step >= total:
            break
    bar.close()
    write_history(history, out / HISTORY_FILE)
    plot_history(
        history,
        out / CURVE_FILE,
        f"retrieve-tbh{config.bits}"
        + ("" if config.similarity_loss else " (no similarity loss)"),
    )

    # Best state -> fine vector -> test numbers (test queries were never selected on).
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    model.load_state_dict(state["state_dict"])
    model.eval()
    projection, scale = fit_fine(
        model, split.features[split.database], config.fine_kind, config.fine_dim
    )
    head = RetrievalHead(model, config.fine_kind, projection, scale)
    k, pn = config.map_k, config.precision_n
    tbh_eval = evaluate_head(head, split, test_q, k, pn)
    metrics: dict[str, Any] = {
        "k": min(k, n),
        "bits": config.bits,
        "similarity_loss": config.similarity_loss,
        "best_epoch": best_epoch,
        "val_map": best_map,
        "initial_val_map": initial_map,
        "best_at": best_at,
        "epochs_run": history[-1]["epoch"] if history else 0,
        "steps": step,
        "optimisation_seconds": round(train_wall, 1),
        "optimisation_cpu_seconds": round(train_cpu, 1),
        "train_seconds": round(time.perf_counter() - started, 1),
        "test": {
            "tbh": tbh_eval["hamming"],
            "tbh+fine": tbh_eval["hamming+fine"],
            "lsh": lsh_metrics(split, test_q, config.bits, k, pn),
            "float_cosine": cosine_metrics(split, test_q, k, pn),
        },
        "fine": {"kind": config.fine_kind, "dim": head.fine_dim, "scale": scale},
    }
    state.update(
        fine={"kind": config.fine_kind, "projection": projection, "scale": scale},
        evaluation=metrics,
    )
    _save(ckpt, state)
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    return RetrieveResult(ckpt, metrics)


def load_checkpoint(checkpoint: Path) -> tuple[TBH, RetrievalHead, dict[str, Any]]:
    """(TBH in eval mode, its inference head, the raw checkpoint dict)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{checkpoint} is not a {CHECKPOINT_FORMAT} checkpoint")
    if "fine" not in state:
        raise ValueError(f"{checkpoint} has no fine vector (training did not finish)")
    model = TBH(TBHConfig(**state["tbh_config"]))
    model.load_state_dict(state["state_dict"])
    model.eval()
    fine = state["fine"]
    head = RetrievalHead(model, fine["kind"], fine["projection"], float(fine["scale"]))
    head.eval()
    return model, head, state


# --------------------------------------------------------------------------------------
# Logs


def write_history(history: list[dict[str, float]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)


def plot_history(history: list[dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = np.array([r["epoch"] for r in history])
    panels = (
        ("recon", "reconstruction (MSE, normalised features)"),
        ("similarity", "similarity loss (adjacency MSE)"),
        ("adv_gen", "adversarial: generator / critic"),
        ("val_map", "validation mAP (Hamming ranking)"),
    )
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, (key, label) in zip(axes, panels, strict=True):
        values = np.array([r.get(key, np.nan) for r in history], dtype=float)
        ok = ~np.isnan(values)
        ax.plot(epochs[ok], values[ok], lw=1.3, color="tab:blue", label=key)
        if key == "adv_gen":
            critic = np.array([r.get("critic", np.nan) for r in history], dtype=float)
            ax.plot(epochs, critic, lw=1.3, color="tab:orange", label="critic")
            ax.legend(fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="Train the retrieval TBH hashing head.")
    p.add_argument("images", type=Path)
    p.add_argument("out", type=Path)
    defaults = RetrieveTrainConfig(images=Path("."), out=Path("."))
    for f in fields(RetrieveTrainConfig):
        if f.name in ("images", "out"):
            continue
        default = getattr(defaults, f.name)
        flag = f"--{f.name.replace('_', '-')}"
        if isinstance(default, bool):
            p.add_argument(flag, type=_parse_bool, default=default)
        elif f.name in ("limit", "max_steps"):
            p.add_argument(flag, type=int, default=default)
        elif f.name in ("cache_dir", "backbone_checkpoint"):
            p.add_argument(flag, type=Path, default=default)
        else:
            p.add_argument(flag, type=type(default), default=default)
    args = vars(p.parse_args(argv))
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    result = train_retrieval(replace(defaults, **args))
    log.info("checkpoint: %s", result.checkpoint)
    log.info("test metrics: %s", json.dumps(result.metrics["test"]))


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text}")


if __name__ == "__main__":
    main()
