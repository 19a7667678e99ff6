"""Query-time views and decision rules for detection, compared on the held-out split of
`copyfree eval detect` with brute-force cosines (every query against every registered
original's second key, top-1 cosine, threshold at 1 % false matches on the calibration
distractors). A quick screen for ideas before they go through the real Detect and
`copyfree calibrate`; docs/models.md records what it found.

    .venv/bin/python benchmarks/detect_views.py [--images DIR] [--bundle DIR]
        [--only-background]

Keys of each extra view are cached under artifacts/detect/views/<bundle version>/
(about 1 min per view cold on 2 cores). With a bundle that has a background bank
(copyfree.background), rows with the query's background similarity subtracted follow;
--only-background computes just the border view and those rows.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from copyfree.background import BackgroundBank
from copyfree.folders import scan_folder
from copyfree.preprocess import border_box, decode, trim_border
from copyfree_train import eval_detect as E

View = Callable[[Image.Image], Image.Image]
FAMILIES = ("BA", "CA", "H2", "FL", "H4", "TR", "RT", "rot", "GN", "border", "pad")


@contextlib.contextmanager
def viewed(view: View) -> Iterator[None]:
    """Every eval query image (registered originals included) through `view`."""
    plain = E.query_image
    E.query_image = lambda data, q, base: view(plain(data, q, base))
    try:
        yield
    finally:
        E.query_image = plain


def keys(config: E.DetectEvalConfig, data: E.EvalData, name: str) -> np.ndarray:
    """Unit-norm second keys of every query, as they are or through a named view."""
    if name == "as-is":
        raw = E.bundle_keys(config, data)["second_key"]
    else:
        version = E.read_manifest(config.bundle).version
        cache = Path("artifacts/detect/views") / version / name
        with viewed(VIEWS[name]):
            raw = E.bundle_keys(E.replace(config, cache_dir=cache), data)["second_key"]
    k = raw.astype(np.float32)
    return k / (np.linalg.norm(k, axis=1, keepdims=True) + 1e-9)


def trimmed_or_same(im: Image.Image) -> Image.Image:
    return trim_border(im) or im


def cropped(im: Image.Image) -> Image.Image:
    """Cropped to border_box whatever the border's balance."""
    box = border_box(im)
    return im if box is None else im.crop(box)


def derotated(im: Image.Image) -> Image.Image:
    """Turned back by the same-canvas rotation whose fill corners fit best (96-px
    probe, 2-degree steps), or as it is when no rotation fill is found."""
    small = im.copy()
    small.thumbnail((96, 96))
    a = np.asarray(small.convert("RGB"), np.int16)
    corners = np.array([a[0, 0], a[0, -1], a[-1, 0], a[-1, -1]])
    fill = np.median(corners, axis=0)
    observed = np.abs(a - fill).max(axis=2) <= 24
    if np.abs(corners - fill).max() > 24 or observed.mean() < 0.03:
        return im
    ones = Image.new("L", small.size, 255)
    best, angle = 0.0, 0
    for theta in range(-90, 91, 2):
        predicted = np.asarray(ones.rotate(theta, fillcolor=0)) == 0
        if theta and predicted.any():
            score = (predicted & observed).sum() / predicted.sum()
            if score > best:
                best, angle = score, theta
    if best < 0.9:
        return im
    colour = tuple(int(v) for v in fill)
    return im.rotate(-angle, resample=Image.Resampling.BILINEAR, fillcolor=colour)


VIEWS: dict[str, View] = {
    "border": trimmed_or_same,
    "crop": cropped,
    "flip": lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    "autocontrast": lambda im: ImageOps.autocontrast(im, cutoff=0.5),
    "derotate": derotated,
}


def hue_histograms(data: E.EvalData, bins: int = 12) -> np.ndarray:
    """Per query, a saturation-weighted hue histogram (mass = colourfulness)."""
    out = np.zeros((len(data.queries), bins), np.float32)
    base: dict[int, Image.Image] = {}
    for j, q in enumerate(data.queries):
        if q.image not in base:
            base = {q.image: data.image(q.image)}
        im = E.query_image(data, q, base[q.image]).convert("RGB")
        hsv = np.asarray(im.resize((64, 64), Image.Resampling.BOX).convert("HSV"))
        h, s, v = (hsv[..., c].astype(np.float32) / 255 for c in range(3))
        w = s * (v > 0.15) * (s > 0.15)
        idx = (h * bins).astype(int).clip(0, bins - 1).ravel()
        out[j] = np.bincount(idx, weights=w.ravel(), minlength=bins) / h.size
    return out


class Split:
    def __init__(self, data: E.EvalData) -> None:
        qs = data.queries
        self.role = np.array([q.role for q in qs])
        self.group = np.array([q.group for q in qs])
        self.family = np.array([q.family for q in qs])
        self.truth = np.array([q.truth or "" for q in qs], dtype=object)
        orig = E.original_rows(data)
        self.reg = [orig[i] for i in data.registered]
        self.ids = np.array([data.records[i].item_id for i in data.registered], object)

    def row(self, name: str, score: np.ndarray, picked: np.ndarray) -> str:
        calib = np.sort(score[self.role == "calib"])[::-1]
        t = calib[int(0.01 * len(calib))] + 1e-9  # <= 1 % of calibration queries pass
        hit = score >= t
        right = hit & (picked == self.truth)
        pos = self.role == "positive"
        groups = [
            right[pos & (self.group == g)].mean()
            for g in ("original", "weak", "hybrid", "practical")
        ]
        fams = [right[pos & (self.family == f)].mean() for f in FAMILIES]
        cells = [f"{t:.4f}", f"{100 * hit[self.role == 'test'].mean():.1f}"]
        cells += [f"{100 * v:.1f}" for v in groups + fams]
        return f"| {name} | " + " | ".join(cells) + " |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=Path, default=Path("../shared/datasets/dev"))
    p.add_argument("--bundle", type=Path, default=Path("models/detect-lite0"))
    p.add_argument("--only-background", action="store_true")
    args = p.parse_args()
    config = E.DetectEvalConfig(
        images=args.images, bundle=args.bundle, hashers=("keys",)
    )
    data = E.prepare(config)
    split = Split(data)
    views = ("border",) if args.only_background else tuple(VIEWS)
    k = {name: keys(config, data, name) for name in ("as-is", *views)}
    reg = k["as-is"][split.reg]

    def top(q: np.ndarray, r: np.ndarray = reg, ids: np.ndarray = split.ids):
        s = q @ r.T
        j = s.argmax(axis=1)
        return s[np.arange(len(q)), j], ids[j], s

    def better(a: tuple, b: tuple) -> tuple:  # the higher-scoring of two answers
        take = b[0] > a[0]
        return np.where(take, b[0], a[0]), np.where(take, b[1], a[1])

    header = "| rule | T2 | fm test | original | weak | hybrid | practical | "
    header += " | ".join(FAMILIES) + " |"
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    plain = top(k["as-is"])
    lines.append(split.row("as is", plain[0], plain[1]))
    bank = BackgroundBank.load(config.bundle, E.read_manifest(config.bundle))
    if bank is not None:
        # score = cosine - w * background(query), for the image as is and its
        # border-trimmed view (copyfree.background; the keys are unit rows here)
        s_view = top(k["border"])[2]
        bg, bg_view = bank.similarity(k["as-is"]), bank.similarity(k["border"])
        for w in (0.25, 0.4, 0.5, 0.6):
            scored = np.maximum(
                plain[2] - w * bg[:, None], s_view - w * bg_view[:, None]
            )
            j = scored.argmax(axis=1)
            score = scored[np.arange(len(j)), j]
            lines.append(split.row(f"+ border, background w {w}", score, split.ids[j]))
    if args.only_background:
        print("\n".join(lines))  # noqa: T201 (the report)
        return
    ranked = np.sort(plain[2], axis=1)[:, ::-1]
    for b in (0.25, 0.5):
        s = ranked[:, 0] - b * ranked[:, 1]
        lines.append(split.row(f"as is, s1 - {b} s2", s, plain[1]))
    border = better(plain[:2], top(k["border"])[:2])
    lines.append(split.row("+ border view (shipped)", *border))
    lines.append(split.row("+ border + flip", *better(border, top(k["flip"])[:2])))
    lines.append(
        split.row(
            "+ border + autocontrast", *better(border, top(k["autocontrast"])[:2])
        )
    )
    lines.append(
        split.row("+ border + derotate", *better(border, top(k["derotate"])[:2]))
    )
    crop = top(k["crop"], k["crop"][split.reg])
    lines.append(split.row("both sides cropped", crop[0], crop[1]))
    both = np.concatenate([reg, k["crop"][split.reg]])
    ids2 = np.concatenate([split.ids, split.ids])
    reg_both = better(top(k["as-is"], both, ids2)[:2], top(k["crop"], both, ids2)[:2])
    lines.append(split.row("register and query both", *reg_both))
    hue = hue_histograms(data)
    s_all = np.maximum(plain[2], top(k["border"])[2])
    mass_q, mass_r = hue.sum(1), hue[split.reg].sum(1)
    gap = np.abs(hue[:, None, :] - hue[split.reg][None, :, :]).sum(2)
    both_colourful = (mass_q[:, None] > 0.05) & (mass_r[None, :] > 0.05)
    for tau in (0.1, 0.3):
        ok = ~both_colourful | (gap <= tau * np.maximum(mass_q[:, None], mass_r))
        s = np.where(ok, s_all, -3)
        j = s.argmax(1)
        lines.append(
            split.row(
                f"+ border, hue check {tau}", s[np.arange(len(s)), j], split.ids[j]
            )
        )
    print("\n".join(lines))  # noqa: T201 (the report)

    images = [decode(Path(r.path).read_bytes()) for r in scan_folder(args.images)[::5]]
    started = time.perf_counter()
    bordered = sum(border_box(im) is not None for im in images)
    ms = 1000 * (time.perf_counter() - started) / len(images)
    print(  # noqa: T201
        f"\nborder_box on {len(images)} images of {args.images}: "
        f"{100 * bordered / len(images):.0f} % have a border; {ms:.1f} ms per image"
    )


if __name__ == "__main__":
    main()
