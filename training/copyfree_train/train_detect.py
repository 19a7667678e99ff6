"""Trainer for the detection models (the CVAE, or `--model lite0`: the fine-tuned
EfficientNet-Lite0 of copyfree_train.lite_keys): config, data split, training loop with
resumable checkpoints, loss log (CSV) and loss curve (PNG).

Each step sees every image twice: as the original and as an augmented copy
(copyfree_train.attacks: `--views seed000`, the seed-000 policy the shipped runs used,
or `--views suite`, seed-004 weak/strong views drawn from the attack suite). Both
views are encoded in one batch; the decoder always reconstructs the *original*
(denoising-style), so an edited copy has to land where its original lands. A small
invariance term pulls mu(copy) toward mu(original) directly, measured per latent
dimension in units of that dimension's spread over the batch: a bit of the first key
flips when the copy moves across theta, and what matters for that is the copy's shift
relative to how far apart different images are, not its absolute size (which KL
shrinks anyway). Dividing by the spread also means the term cannot be reduced
by collapsing the latent. It can be reduced by inflating every dim with one shared,
edit-proof factor, though -- the first dev-corpus run did exactly that (one principal
component held 84% of the variance, and a third of unrelated image pairs fell within
12 bits) -- so a decorrelation term keeps the 64 dims apart.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from copyfree import preprocess
from copyfree_train import cvae, lite_keys
from copyfree_train.attacks import VIEWS
from copyfree_train.data import (
    ImageCache,
    ImageRecord,
    make_inputs,
    read_siblings,
    scan_folder,
    sibling_groups,
    split_records,
)


@dataclass(frozen=True)
class Detector:
    """One selectable detection model: how to build it and what input it takes."""

    architecture: str  # recorded in checkpoints and bundles
    # config -> module with .encoder (which has .embed) and .decoder (None: none)
    build: Callable[[DetectTrainConfig], torch.nn.Module]
    preprocess: preprocess.PreprocessSpec
    bundle_name: str


# "cvae" is the paper-faithful model of seeds 000/001; "lite0" the fine-tuned
# EfficientNet-Lite0 (no decoder: trained by the invariance, decorrelation and
# contrastive terms alone).
DETECTORS = {
    "cvae": Detector(
        cvae.ARCHITECTURE, lambda _: cvae.CVAE(), cvae.PREPROCESS, "detect-cvae"
    ),
    "lite0": Detector(
        lite_keys.ARCHITECTURE,
        lambda config: lite_keys.LiteDetector(train_from=config.lite_train_from),
        lite_keys.PREPROCESS,
        "detect-lite0",
    ),
}

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
CONFIG_FILE = "config.json"
LOSSES_FILE = "losses.csv"
CURVE_FILE = "loss_curve.png"
SUMMARY_FILE = "summary.json"
HOLDOUT_FILE = "holdout_ids.txt"
LOSS_COLUMNS = (
    "epoch", "step", "lr", "total", "recon", "kl", "invariance", "decorrelation",
    "contrastive",
)  # fmt: skip
_LOSS_PARTS = ("total", "recon", "kl", "invariance", "decorrelation", "contrastive")
# Fields that may change between a run and its resumption without changing the model.
_RESUMABLE_CHANGES = {"epochs", "max_steps", "threads", "bf16"}


@dataclass(frozen=True)
class DetectTrainConfig:
    images: Path
    out: Path
    epochs: int = 20
    model: str = "cvae"  # a DETECTORS key
    # lite0 only: the first backbone block that trains (0 = all of it, stem included).
    lite_train_from: int = lite_keys.TRAIN_FROM_BLOCK
    batch_size: int = 64
    lr: float = 1e-3
    lr_min: float = 1e-5  # cosine decay floor
    beta: float = 1.0  # KL weight
    invariance: float = 50.0  # weight of the mu(copy) ~ mu(original) term; 0 = off
    # Weight of the penalty on correlations between latent dims over a batch; 0 = off.
    decorrelation: float = 25.0
    init_from: Path | None = None  # start from this checkpoint's weights (fine-tune)
    seed: int = 0
    limit: int | None = None  # max images scanned (before the split)
    max_steps: int | None = None  # cap on steps per epoch (tests, smoke runs)
    augment: bool = True  # False: the copy view is the original itself
    views: str = "seed000"  # copy views: a copyfree_train.attacks.VIEWS policy
    # Weight of the InfoNCE term on cosine(mu(copy), mu(original)) against the other
    # images of the batch (seed 004's contrastive objective on the second key's
    # metric); 0 = off.
    contrastive: float = 0.0
    temperature: float = 0.1
    # Share of each batch filled with whole look-alike groups (the "variant" pairs of
    # the folder's near_duplicates.csv: recolours, one deck's cards), so that the
    # contrastive term has siblings to push apart; 0 = plain shuffled batches.
    hard_negatives: float = 0.0
    threads: int = 2
    holdout: float = 0.2  # fraction never trained on (evaluation)
    split_seed: int = 20261122
    keep_size: int = 256  # cache images downscaled to this longer side
    # bfloat16 autocast for the forward pass (weights, optimizer and export stay
    # float32): about 1.8x faster on CPUs whose oneDNN has AMX, slower on others.
    bf16: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["images"], d["out"] = str(self.images), str(self.out)
        d["init_from"] = None if self.init_from is None else str(self.init_from)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DetectTrainConfig:
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["images"], kw["out"] = Path(kw["images"]), Path(kw["out"])
        if kw.get("init_from") is not None:
            kw["init_from"] = Path(kw["init_from"])
        return cls(**kw)


def load_config(out_dir: Path) -> DetectTrainConfig:
    return DetectTrainConfig.from_dict(
        json.loads((Path(out_dir) / CONFIG_FILE).read_text())
    )


def training_records(
    config: DetectTrainConfig,
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(train, held-out) records, fixed by (images, limit, holdout, split_seed)."""
    records = scan_folder(config.images, limit=config.limit)
    if config.holdout <= 0:
        return records, []
    train, held = split_records(
        records, [1.0 - config.holdout, config.holdout], config.split_seed
    )
    return train, held


def inputs_for(
    images: Sequence[Image.Image],
    rng: np.random.Generator | None,
    views: str = "seed000",
    spec: preprocess.PreprocessSpec = cvae.PREPROCESS,
) -> np.ndarray:
    """The model input of each image, augmented when rng is given (same conversion as
    serving: copyfree.preprocess.to_input via make_inputs)."""
    if rng is None:
        return make_inputs(images, spec)
    view = VIEWS[views]
    return make_inputs(images, spec, augment=lambda im: view(im, rng))


def batch_order(
    n: int,
    batch: int,
    groups: Sequence[Sequence[int]],
    share: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """A permutation of range(n) whose consecutive `batch`-long slices each start
    with whole groups (up to share * batch images), then single images, all shuffled.
    Groups larger than that share are split; once one kind runs out the other fills."""
    per_batch = max(2, int(round(share * batch)))
    pieces = []
    for gi in rng.permutation(len(groups)):
        g = rng.permutation(np.asarray(groups[int(gi)]))
        pieces += [g[i : i + per_batch] for i in range(0, len(g), per_batch)]
    in_group = np.zeros(n, bool)
    for g in groups:
        in_group[np.asarray(g, dtype=np.int64)] = True
    singles = list(rng.permutation(np.flatnonzero(~in_group)))
    out: list[int] = []
    while pieces or singles:
        chunk: list[int] = []
        while pieces and len(chunk) + len(pieces[-1]) <= per_batch:
            chunk += pieces.pop().tolist()
        while singles and len(chunk) < batch:
            chunk.append(int(singles.pop()))
        while pieces and len(chunk) < batch:  # no singles left
            chunk += pieces.pop().tolist()
        out += chunk[:batch]
        if len(chunk) > batch:  # a group split at the batch end starts the next
            pieces.append(np.asarray(chunk[batch:]))
    return np.asarray(out, dtype=np.int64)


def invariance_loss(mu_copy: torch.Tensor, mu_orig: torch.Tensor) -> torch.Tensor:
    """Sum over dims of mean squared copy shift / spread of that dim over the batch."""
    both = torch.cat([mu_copy, mu_orig])
    spread = both.var(dim=0, unbiased=False) + 1e-4
    return ((mu_copy - mu_orig).pow(2).mean(0) / spread).sum()


def contrastive_loss(
    mu_copy: torch.Tensor, mu_orig: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Symmetric InfoNCE: each copy must be closer (cosine, the stage-2 metric of the
    second key) to its own original than to every other original of the batch, and
    each original to its own copy. Pushes different images apart as much as it pulls
    copies together, which the invariance term alone does not."""
    a = torch.nn.functional.normalize(mu_copy, dim=1)
    b = torch.nn.functional.normalize(mu_orig, dim=1)
    logits = a @ b.T / temperature
    target = torch.arange(len(a), device=a.device)
    return 0.5 * (
        torch.nn.functional.cross_entropy(logits, target)
        + torch.nn.functional.cross_entropy(logits.T, target)
    )


def decorrelation_loss(mu: torch.Tensor) -> torch.Tensor:
    """Mean over dims of the summed squared correlations with the other dims.

    Without it the latent can put one easy, edit-proof factor (how much of the image
    is white ink-free paper) into every dim: each bit then follows that one factor,
    copies keep their keys, and so do a third of unrelated images (measured on the
    first run). Decorrelated dims make the 64 bits carry 64 different questions.
    """
    z = mu - mu.mean(0)
    z = z / (z.pow(2).mean(0).sqrt() + 1e-4)
    corr = z.T @ z / z.shape[0]
    off = corr - torch.diag(torch.diagonal(corr))
    return off.pow(2).sum() / mu.shape[1]


def _cosine_lr(config: DetectTrainConfig, step: int, total: int) -> float:
    t = min(step / max(total, 1), 1.0)
    return config.lr_min + 0.5 * (config.lr - config.lr_min) * (
        1.0 + math.cos(math.pi * t)
    )


def _check_resumable(saved: DetectTrainConfig, new: DetectTrainConfig) -> None:
    a, b = saved.to_dict(), new.to_dict()
    changed = sorted(k for k in a if k not in _RESUMABLE_CHANGES and a[k] != b.get(k))
    if changed:
        raise ValueError(
            f"{new.out} holds a run with a different config ({', '.join(changed)}); "
            "use another out dir or the same settings"
        )


def train_detection(config: DetectTrainConfig) -> Path:
    """Train (or resume) and return the checkpoint path. Writes into config.out:
    checkpoint.pt, config.json, losses.csv, loss_curve.png, summary.json,
    holdout_ids.txt."""
    if config.views not in VIEWS:
        raise ValueError(f"views must be one of {sorted(VIEWS)}, got {config.views!r}")
    if config.model not in DETECTORS:
        raise ValueError(
            f"model must be one of {sorted(DETECTORS)}, got {config.model!r}"
        )
    if not 0.0 <= config.hard_negatives <= 1.0:
        raise ValueError(
            f"hard_negatives is a share of the batch in [0, 1], got "
            f"{config.hard_negatives}"
        )
    detector = DETECTORS[config.model]
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(config.threads)
    ckpt_path = out / CHECKPOINT_FILE

    torch.manual_seed(config.seed)
    model = detector.build(config)
    # fused: one kernel over all 35M parameters, several times faster on CPU
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=config.lr, fused=True)
    start_epoch, step, seconds = 0, 0, 0.0
    history: list[dict[str, float]] = []
    if config.init_from is not None and not ckpt_path.is_file():
        # Weights only: a fine-tune gets its own optimizer state and LR schedule.
        init = torch.load(config.init_from, map_location="cpu", weights_only=False)
        model.load_state_dict(init["model"])
        log.info("initialised from %s", config.init_from)
    if ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        _check_resumable(DetectTrainConfig.from_dict(state["config"]), config)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, step = int(state["epoch"]), int(state["step"])
        seconds, history = float(state["seconds"]), list(state["history"])
        log.info("resuming %s at epoch %d (step %d)", ckpt_path, start_epoch, step)
    (out / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    if start_epoch >= config.epochs:
        return ckpt_path

    train, held = training_records(config)
    (out / HOLDOUT_FILE).write_text("".join(f"{r.item_id}\n" for r in held))
    log.info("training on %d images (%d held out)", len(train), len(held))
    cache = ImageCache(train, keep_size=config.keep_size)
    n = len(cache)
    batch = min(config.batch_size, n)
    # Drop the ragged tail of each shuffled epoch: BatchNorm wants full batches.
    steps_per_epoch = max(1, n // batch)
    if config.max_steps is not None:
        steps_per_epoch = min(steps_per_epoch, config.max_steps)
    total_steps = config.epochs * steps_per_epoch
    groups: list[list[int]] = []
    if config.hard_negatives > 0:
        pairs = read_siblings(config.images, {"variant"})
        groups = [g for g in sibling_groups(train, pairs) if len(g) > 1]
        log.info(
            "hard negatives: %d look-alike groups (%d images) in the batches",
            len(groups),
            sum(map(len, groups)),
        )

    for epoch in range(start_epoch, config.epochs):
        # Per-epoch seeds: a resumed run replays exactly what an unbroken one would.
        rng = np.random.default_rng([config.seed, epoch])
        torch.manual_seed(config.seed * 100_003 + epoch)
        order = (
            batch_order(n, batch, groups, config.hard_negatives, rng)
            if config.hard_negatives > 0
            else rng.permutation(n)
        )
        model.train()
        started = time.perf_counter()
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"epoch {epoch + 1}/{config.epochs}",
            leave=False,
            dynamic_ncols=True,
        )
        for i in bar:
            lr = _cosine_lr(config, step, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images = [cache[int(j)] for j in order[i * batch : (i + 1) * batch]]
            row = _train_step(
                model,
                optimizer,
                images,
                rng if config.augment else None,
                config,
            )
            step += 1
            row.update(epoch=epoch + 1, step=step, lr=lr)
            history.append(row)
            bar.set_postfix(loss=f"{row['total']:.1f}", inv=f"{row['invariance']:.2f}")
        bar.close()
        seconds += time.perf_counter() - started
        epoch_rows = [r for r in history if r["epoch"] == epoch + 1]
        means = {
            k: float(np.mean([r.get(k, 0.0) for r in epoch_rows])) for k in _LOSS_PARTS
        }
        log.info(
            "epoch %d/%d: %s",
            epoch + 1,
            config.epochs,
            ", ".join(f"{k} {v:.3f}" for k, v in means.items()),
        )
        summary = {
            "architecture": detector.architecture,
            "images": n,
            "held_out": len(held),
            "epochs": epoch + 1,
            "steps": step,
            "seconds": round(seconds, 1),
            "final_losses": means,
            "config": config.to_dict(),
        }
        _save_checkpoint(
            ckpt_path,
            model,
            optimizer,
            epoch + 1,
            step,
            seconds,
            history,
            config,
            summary,
        )
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        write_losses(history, out / LOSSES_FILE)
        plot_losses(history, out / CURVE_FILE)
    return ckpt_path


def _train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    images: Sequence[Image.Image],
    rng: np.random.Generator | None,
    config: DetectTrainConfig,
) -> dict[str, float]:
    spec = DETECTORS[config.model].preprocess
    x_orig = torch.from_numpy(inputs_for(images, None, spec=spec))
    x_copy = (
        torch.from_numpy(inputs_for(images, rng, config.views, spec))
        if rng is not None
        else x_orig
    )
    k = len(images)
    # One encoder pass over both views: BatchNorm sees one batch statistic for both.
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
        if model.decoder is None:
            mu = model.encoder.embed(torch.cat([x_copy, x_orig]))
        else:
            mu, logvar = model.encoder(torch.cat([x_copy, x_orig]))
            z = model.reparameterise(mu, logvar)
            logits = model.decoder.logits(z)
    # Losses in float32: sums over 16384 pixels lose too much in bfloat16.
    mu = mu.float()
    if model.decoder is None:
        zero = torch.zeros(())
        parts = cvae.LossParts(zero, zero, zero)
    else:
        parts = cvae.vae_loss(
            logits.float(),
            torch.cat([x_orig, x_orig]),
            mu,
            logvar.float(),
            config.beta,
        )
    inv = (
        invariance_loss(mu[:k], mu[k:])
        if config.invariance > 0 and rng is not None
        else torch.zeros(())
    )
    decor = decorrelation_loss(mu) if config.decorrelation > 0 else torch.zeros(())
    con = (
        contrastive_loss(mu[:k], mu[k:], config.temperature)
        if config.contrastive > 0 and rng is not None
        else torch.zeros(())
    )
    loss = (
        parts.total
        + config.invariance * inv
        + config.decorrelation * decor
        + config.contrastive * con
    )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {
        "total": float(loss.detach()),
        "recon": float(parts.recon.detach()),
        "kl": float(parts.kl.detach()),
        "invariance": float(inv.detach()),
        "decorrelation": float(decor.detach()),
        "contrastive": float(con.detach()),
    }


def _save_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    step: int,
    seconds: float,
    history: list[dict[str, float]],
    config: DetectTrainConfig,
    summary: dict[str, Any],
) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch,
            "step": step,
            "seconds": seconds,
            "history": history,
            "config": config.to_dict(),
            "summary": summary,
            "architecture": DETECTORS[config.model].architecture,
        },
        tmp,
    )
    tmp.replace(path)  # atomic: an interrupted save never leaves a broken checkpoint


def load_model(checkpoint: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The trained detector in eval mode + the checkpoint's summary."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    config = DetectTrainConfig.from_dict(state["config"])
    detector = DETECTORS[config.model]
    if state.get("architecture") != detector.architecture:
        raise ValueError(f"{checkpoint} is not a {detector.architecture} checkpoint")
    model = detector.build(config)
    model.load_state_dict(state["model"])
    model.eval()
    return model, dict(state["summary"])


def write_losses(history: list[dict[str, float]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOSS_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)


def plot_losses(
    history: list[dict[str, float]],
    path: Path,
    marks: dict[int, str] | None = None,
) -> None:
    """Loss curves per step (raw and smoothed); marks: step -> label, drawn as lines
    (e.g. where a fine-tune starts when histories are joined)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([r["step"] for r in history])
    panels = {
        "recon": "reconstruction (BCE, sum/image)",
        "kl": "KL (sum/image)",
        "invariance": "invariance (copy vs original)",
        "decorrelation": "decorrelation (latent dims)",
        "contrastive": "contrastive (InfoNCE)",
    }
    fig, axes = plt.subplots(1, len(panels), figsize=(21, 3.6), sharex=True)
    for ax, (key, title) in zip(axes, panels.items(), strict=True):
        values = np.array([r.get(key, 0.0) for r in history])
        ax.plot(steps, values, lw=0.6, alpha=0.4, color="tab:blue")
        window = max(1, len(values) // 40)
        if window > 1:
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1 :], smooth, lw=1.5, color="tab:blue")
        for step, label in (marks or {}).items():
            ax.axvline(step, color="tab:red", lw=0.8, ls="--")
            ax.annotate(
                label,
                (step, 0.97),
                xycoords=("data", "axes fraction"),
                fontsize=8,
                color="tab:red",
                ha="right",
                va="top",
                rotation=90,
            )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle("detect-cvae training loss", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="Train a detection model.")
    p.add_argument("images", type=Path)
    p.add_argument("out", type=Path)
    defaults = DetectTrainConfig(images=Path("."), out=Path("."))
    for f in fields(DetectTrainConfig):
        if f.name in ("images", "out"):
            continue
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            p.add_argument(
                f"--{f.name.replace('_', '-')}", type=_parse_bool, default=default
            )
        elif f.name in ("limit", "max_steps"):
            p.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=default)
        elif f.name == "init_from":
            p.add_argument("--init-from", type=Path, default=None)
        else:
            p.add_argument(
                f"--{f.name.replace('_', '-')}", type=type(default), default=default
            )
    args = vars(p.parse_args(argv))
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    config = replace(defaults, **args)
    path = train_detection(config)
    log.info("checkpoint: %s", path)


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text}")


if __name__ == "__main__":
    main()
