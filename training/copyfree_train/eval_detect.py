"""`copyfree eval detect`: the detection report of issue 6, end to end.

Owns the evaluation split, the attacked copies, the codes of every hasher on the same
images, and the report (markdown + JSON + figures).

Split: the bundle's held-out images only (the trainer's split, recomputed from the
manifest; no image of it was trained on). They are divided, deterministically, into
registered originals and never-registered distractors. Look-alike siblings
(near_duplicates.csv of the image folder) are hard negatives: a group of siblings
contributes one registered image and its siblings go to the distractors. Distractors are
halved: calibration distractors (what `copyfree calibrate` and the per-hasher thresholds
are fitted on) and test distractors (where false-match rates are measured). A
distractor that is the same picture as a registered original under the dataset's own
`same_image` rule (mean absolute difference under 2 levels on a 16x16 thumbnail; here
in RGB, so a recolour stays a negative) but is not listed in near_duplicates.csv is a
copy, not a negative: it is left out and counted.

Queries: every registered original unmodified; for each attack of copyfree_train.attacks
(176 variants: seed 004 Table 1 with every parameter, Table 2, seed 000, practical
edits), `per_attack` registered originals (a fixed random choice per attack), attacked;
every distractor unmodified and in two everyday edits (JPEG 75, downscale 0.5 and up).
Images are first downscaled to `work_size` on the longer side (the trainer's cache size;
every model here looks at 128-224 pixels).

Hashers, on the same images: the detection bundle (ONNX, as the encoder runs it; first
keys), pHash (imagehash, 64 bits), PDQ (pdqhash, 256 bits; and matched over its 8
dihedral orientations, "pdq8"), and a training-free deep baseline: EfficientNet-Lite0
pooled features, centred on the mean of the registered originals, sign of a fixed
Gaussian random projection to 64 and 256 bits.

Metrics:
- seed 004: NHD_d over all pairs of different held-out originals (mean, std, and the
  threshold tau giving 1 % false positives on those pairs); per attack family, NHD_r
  (mean, std) and F1 = TP / (TP + (FP + FN) / 2) at tau, positives = (original,
  attacked copy), negatives = (another original, the same copy); averages over the 25
  seed-004 families (17 single + H1-H8).
- identification, 1:N: the bundle's keys in a real index shard, queried with its Detect
  and judged by the gateway's decision (copyfree_train.calibrate.Registry), at the
  bundle's thresholds and at thresholds calibrated to the target false-match rate on the
  calibration distractors; the baselines by nearest registered code within a threshold
  calibrated the same way. Share of copies REGISTERED with the right id per group and
  family, wrong-id matches, false-match rate on the test distractors.
- seed 000 Table 4: collision rate = images whose code equals another image's / images.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from copyfree import preprocess
from copyfree.background import BackgroundBank
from copyfree.bundle import (
    DETECTION_OUTPUTS,
    INPUT_NAME,
    MODEL_FILE,
    read_manifest,
)
from copyfree.codes import unpack_bits
from copyfree.preprocess import to_input, trim_border
from copyfree_train import attacks as A
from copyfree_train.calibrate import (
    Calibration,
    Queries,
    Registry,
    calibrate,
    collect_picks,
)
from copyfree_train.data import ImageRecord, load_rgb, read_siblings, sibling_groups

log = logging.getLogger(__name__)

DEFAULT_BUNDLE = Path("models/detect-lite0")
DEFAULT_OUT = Path("artifacts/detect/eval")
DEFAULT_CACHE = Path("artifacts/detect/cache")
HASHERS = ("keys", "phash", "pdq", "deep")
DISTRACTOR_EDITS = ("jpeg:75", "downup:0.5")
DEEP_SEED = 20261122  # the fixed random projection of the deep baseline
GROUP_ORDER = ("original", "weak", "hybrid", "practical")
OPERATING_POINTS = (0.01, 0.05, 0.10)  # false-match targets of the trade-off table
FALSE_POSITIVE_RATE = 0.01  # seed 004's pairwise operating point


@dataclass(frozen=True)
class DetectEvalConfig:
    images: Path
    bundle: Path = DEFAULT_BUNDLE
    out: Path = DEFAULT_OUT
    cache_dir: Path = DEFAULT_CACHE
    figures: Path | None = None
    registered: int = (
        300  # registered originals (the rest of the held-out part: distractors)
    )
    per_attack: int = 10  # attacked copies per attack variant
    limit: int | None = None  # use at most this many held-out images
    work_size: int = 256
    hashers: tuple[str, ...] = HASHERS
    target_fmr: float = 0.01
    threads: int = 2
    seed: int = 0


# ----------------------------------------------------------------- split and queries


@dataclass(frozen=True)
class Query:
    image: int  # index into EvalData.records
    attack: str | None  # attack key; None = the image itself
    group: str  # original / weak / hybrid / practical / distractor
    family: str  # attack family ("-" for unmodified)
    truth: str | None  # registered id it should match; None for a distractor
    role: str  # positive / calib / test


@dataclass
class EvalData:
    records: list[ImageRecord]  # the held-out images used
    registered: list[int]  # indices into records, ordered by id
    calib_distractors: list[int]
    test_distractors: list[int]
    queries: list[Query]
    negatives: np.ndarray  # per query: another registered original (seed-004 negatives)
    work_size: int
    siblings_held: int  # held-out images with a look-alike sibling in the held-out part
    duplicates_dropped: int = 0  # distractors that are a registered picture (unlisted)

    def split_summary(self) -> dict[str, int]:
        return {
            "held_out_used": len(self.records),
            "registered": len(self.registered),
            "calibration_distractors": len(self.calib_distractors),
            "test_distractors": len(self.test_distractors),
            "held_out_with_sibling": self.siblings_held,
            "distractors_dropped_as_duplicates": self.duplicates_dropped,
            "queries": len(self.queries),
        }

    def image(self, i: int) -> Image.Image:
        im = load_rgb(self.records[i].path)
        im.thumbnail((self.work_size, self.work_size), Image.Resampling.BILINEAR)
        return im


def split_heldout(
    held: Sequence[ImageRecord],
    siblings: Sequence[tuple[str, str]],
    n_registered: int,
    seed: int,
) -> tuple[list[int], list[int], list[int], int]:
    """(registered, calibration distractors, test distractors, images with a sibling).

    Sibling groups (connected components of the look-alike pairs within `held`) come
    first: one member registered, the others distractors (hard negatives). Then the
    remaining images, in a fixed random order, fill the registry up to n_registered.
    """
    groups = sibling_groups(held, siblings)
    rng = np.random.default_rng([seed, 6])
    multi = [sorted(g) for g in groups if len(g) > 1]
    singles = [g[0] for g in groups if len(g) == 1]
    with_sibling = sum(len(g) for g in multi)
    registered: list[int] = []
    distractors: list[int] = []
    for gi in rng.permutation(len(multi)):
        g = multi[int(gi)]
        if len(registered) < n_registered:
            pick = int(rng.integers(len(g)))
            registered.append(g[pick])
            distractors += [j for j in g if j != g[pick]]
        else:
            distractors += g
    for si in rng.permutation(len(singles)):
        (registered if len(registered) < n_registered else distractors).append(
            singles[int(si)]
        )
    registered.sort(key=lambda i: held[i].item_id)
    distractors.sort(key=lambda i: held[i].item_id)
    half = rng.permutation(len(distractors))
    calib = sorted(distractors[int(j)] for j in half[: len(half) // 2])
    test = sorted(distractors[int(j)] for j in half[len(half) // 2 :])
    return registered, calib, test, with_sibling


SAME_PICTURE_THUMB = 16
SAME_PICTURE_MAD = 2.0  # the dataset's same_image rule (datasets/dev/README.md)


def thumbnails(records: Sequence[ImageRecord]) -> np.ndarray:
    """(n, 16 * 16 * 3) float32 RGB thumbnails (area average) of the image files."""
    out = np.empty((len(records), SAME_PICTURE_THUMB**2 * 3), np.float32)
    for i, r in enumerate(records):
        with Image.open(r.path) as im:
            small = im.convert("RGB").resize(
                (SAME_PICTURE_THUMB, SAME_PICTURE_THUMB), Image.Resampling.BOX
            )
        out[i] = np.asarray(small, np.float32).ravel()
    return out


def same_picture_as(
    candidates: Sequence[ImageRecord], references: Sequence[ImageRecord]
) -> np.ndarray:
    """Bool per candidate: its thumbnail is within SAME_PICTURE_MAD of a reference's."""
    if not candidates or not references:
        return np.zeros(len(candidates), bool)
    ref = thumbnails(references)
    cand = thumbnails(candidates)
    hit = np.zeros(len(candidates), bool)
    for i, t in enumerate(cand):
        hit[i] = bool((np.abs(ref - t).mean(axis=1) < SAME_PICTURE_MAD).any())
    return hit


def held_out_records(config: DetectEvalConfig) -> list[ImageRecord]:
    """The bundle's held-out images (the trainer's split, from the manifest)."""
    from copyfree_train.train_detect import DetectTrainConfig, training_records

    manifest = read_manifest(config.bundle)
    training = manifest.extra.get("training", {})
    if "config" not in training:
        raise SystemExit(f"{config.bundle}: manifest has no training config (split)")
    tc = DetectTrainConfig.from_dict(
        {**training["config"], "images": str(config.images)}
    )
    _, held = training_records(tc)
    if not held:
        raise SystemExit("the bundle's training run held out no images")
    return held[: config.limit] if config.limit else held


def prepare(config: DetectEvalConfig) -> EvalData:
    held = held_out_records(config)
    reg, calib, test, with_sib = split_heldout(
        held, read_siblings(config.images), config.registered, config.seed
    )
    duplicate = same_picture_as([held[i] for i in calib + test], [held[i] for i in reg])
    dropped = int(duplicate.sum())
    calib, test = (
        [i for i, d in zip(part, flags, strict=True) if not d]
        for part, flags in (
            (calib, duplicate[: len(calib)]),
            (test, duplicate[len(calib) :]),
        )
    )
    # The dropped images leave the evaluation entirely (records are renumbered).
    kept = sorted(reg + calib + test)
    new_index = {old: new for new, old in enumerate(kept)}
    held = [held[i] for i in kept]
    reg, calib, test = ([new_index[i] for i in part] for part in (reg, calib, test))
    if len(reg) < 2 or not calib or not test:
        raise SystemExit(
            f"{len(held)} held-out images are too few for {config.registered} "
            "registered plus distractors"
        )
    queries: list[Query] = []
    for i in reg:
        queries.append(Query(i, None, "original", "-", held[i].item_id, "positive"))
    for role, part in (("calib", calib), ("test", test)):
        for i in part:
            queries.append(Query(i, None, "distractor", "-", None, role))
            for key in DISTRACTOR_EDITS:
                fam = key.split(":")[0]
                queries.append(Query(i, key, "distractor", fam, None, role))
    per = min(config.per_attack, len(reg))
    for attack in A.suite():
        rng = np.random.default_rng(A.attack_seed(f"pick{config.seed}", attack.key))
        for j in sorted(rng.choice(len(reg), per, replace=False)):
            i = reg[int(j)]
            queries.append(
                Query(
                    i,
                    attack.key,
                    attack.group,
                    attack.family,
                    held[i].item_id,
                    "positive",
                )
            )
    # Seed-004 negative of each query: a registered original that is not its image.
    pos = {i: p for p, i in enumerate(reg)}
    negatives = np.array(
        [
            reg[(pos.get(q.image, -1) + 1 + q.image % (len(reg) - 1)) % len(reg)]
            for q in queries
        ]
    )
    for n, q in zip(negatives, queries, strict=True):
        assert n != q.image
    return EvalData(
        list(held),
        reg,
        calib,
        test,
        queries,
        negatives,
        config.work_size,
        with_sib,
        dropped,
    )


def query_image(data: EvalData, q: Query, base: Image.Image) -> Image.Image:
    if q.attack is None:
        return base
    return A.apply(base, A.by_key()[q.attack], data.records[q.image].item_id)


# ----------------------------------------------------------------- hashers


class Hasher:
    """Images -> arrays (one row per image); `ident` keys the cache."""

    name: str

    def ident(self) -> str:
        return self.name

    def __call__(self, images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
        raise NotImplementedError


class BundleHasher(Hasher):
    name = "keys"

    def __init__(self, bundle: Path, threads: int) -> None:
        import onnxruntime as ort

        self.manifest = read_manifest(bundle)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            str(Path(bundle) / MODEL_FILE), opts, providers=["CPUExecutionProvider"]
        )

    def ident(self) -> str:
        # The preprocessing module's source: a change to the input or the border trim
        # changes the keys, so it must not be served from the cache.
        source = hashlib.blake2b(Path(preprocess.__file__).read_bytes(), digest_size=6)
        return f"keys|{self.manifest.version}|trimmed|{source.hexdigest()}"

    def _keys(self, images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
        x = np.stack([to_input(im, self.manifest.preprocess) for im in images])
        out = dict(
            zip(
                DETECTION_OUTPUTS,
                self.session.run(list(DETECTION_OUTPUTS), {INPUT_NAME: x}),
                strict=True,
            )
        )
        return {"first_key": out["first_key"], "second_key": out["second_key"]}

    def __call__(self, images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
        """Keys of each image as is and of its border-trimmed view (the encoder's
        trim_border; rows without a border repeat the keys, `trimmed` False)."""
        keys = self._keys(images)
        inner = [trim_border(im) for im in images]
        has = np.array([im is not None for im in inner])
        out = {**keys, "trimmed": has}
        for name in ("first_key", "second_key"):
            out[f"trimmed_{name}"] = keys[name].copy()
        if has.any():
            view = self._keys([im for im in inner if im is not None])
            for name in ("first_key", "second_key"):
                out[f"trimmed_{name}"][has] = view[name]
        return out


class PHasher(Hasher):
    name = "phash"

    def __call__(self, images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
        import imagehash

        bits = [imagehash.phash(im).hash.reshape(-1) for im in images]
        return {"bits": np.packbits(np.asarray(bits, bool), axis=1)}


class PdqHasher(Hasher):
    name = "pdq"

    def __call__(self, images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
        import pdqhash

        rows = []
        for im in images:
            hashes, _quality = pdqhash.compute_dihedral(np.asarray(im.convert("RGB")))
            rows.append(np.packbits(np.asarray(hashes, bool), axis=1))
        return {"dihedral": np.asarray(rows, np.uint8)}  # (n, 8, 32); [:, 0] = as is


class DeepHasher(Hasher):
    name = "deep"

    def __init__(self, threads: int) -> None:
        import torch

        from copyfree_train.backbone import build_backbone

        torch.set_num_threads(threads)
        self.torch = torch
        self.backbone = build_backbone("efficientnet_lite0")

    def ident(self) -> str:
        return f"deep|{self.backbone.cache_key()}"

    def __call__(self, images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
        x = np.stack([to_input(im, self.backbone.spec) for im in images])
        with self.torch.no_grad():
            feats = self.backbone(self.torch.from_numpy(x)).numpy()
        return {"features": feats.astype(np.float32)}


def pdq_available() -> bool:
    try:
        import pdqhash  # noqa: F401
    except ImportError:
        return False
    return True


def make_hasher(name: str, config: DetectEvalConfig) -> Hasher:
    if name == "keys":
        return BundleHasher(config.bundle, config.threads)
    if name == "phash":
        return PHasher()
    if name == "pdq":
        return PdqHasher()
    if name == "deep":
        return DeepHasher(config.threads)
    raise ValueError(f"unknown hasher {name!r}; known: {', '.join(HASHERS)}")


def _cache_file(config: DetectEvalConfig, data: EvalData, hasher: Hasher) -> Path:
    h = hashlib.blake2b(digest_size=10)
    h.update(hasher.ident().encode())
    h.update(str(data.work_size).encode())
    for r in data.records:
        h.update(f"{r.item_id}\0{r.path.stat().st_size}\0".encode())
    for q in data.queries:
        h.update(f"{q.image}|{q.attack}\n".encode())
    return Path(config.cache_dir) / f"{hasher.name}-{h.hexdigest()}.npz"


def compute_codes(
    config: DetectEvalConfig, data: EvalData, names: Sequence[str], chunk: int = 64
) -> dict[str, dict[str, np.ndarray]]:
    """Per hasher, its arrays for every query (cached in cache_dir)."""
    hashers = [make_hasher(n, config) for n in names]  # cheap; deep loads weights
    out: dict[str, dict[str, np.ndarray]] = {}
    todo: list[Hasher] = []
    for h in hashers:
        path = _cache_file(config, data, h)
        if path.is_file():
            with np.load(path) as z:
                out[h.name] = {k: z[k] for k in z.files}
            log.info("%s codes from cache %s", h.name, path)
        else:
            todo.append(h)
    if not todo:
        return out
    parts: dict[str, dict[str, list[np.ndarray]]] = {h.name: {} for h in todo}
    seconds = dict.fromkeys(parts, 0.0)
    order = sorted(range(len(data.queries)), key=lambda j: data.queries[j].image)
    started = time.perf_counter()
    base_cache: dict[int, Image.Image] = {}
    for s in range(0, len(order), chunk):
        rows = order[s : s + chunk]
        images = []
        for j in rows:
            q = data.queries[j]
            if q.image not in base_cache:
                base_cache.clear()
                base_cache[q.image] = data.image(q.image)
            images.append(query_image(data, q, base_cache[q.image]))
        for h in todo:
            t0 = time.perf_counter()
            for k, v in h(images).items():
                parts[h.name].setdefault(k, []).append(v)
            seconds[h.name] += time.perf_counter() - t0
        if (s // chunk) % 10 == 0:
            log.info(
                "codes %d/%d (%.0f s)",
                s + len(rows),
                len(order),
                time.perf_counter() - started,
            )
    inverse = np.argsort(order)
    for h in todo:
        arrays = {k: np.concatenate(v)[inverse] for k, v in parts[h.name].items()}
        out[h.name] = arrays
        path = _cache_file(config, data, h)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)
        log.info("%s: %d images in %.0f s", h.name, len(order), seconds[h.name])
    return out


def bundle_keys(config: DetectEvalConfig, data: EvalData) -> dict[str, np.ndarray]:
    """The bundle's keys of every query (cached), with each query's background
    similarity ("background", "trimmed_background") when the bundle has a bank."""
    return with_background(compute_codes(config, data, ["keys"])["keys"], config.bundle)


def with_background(keys: dict[str, np.ndarray], bundle: Path) -> dict[str, np.ndarray]:
    """keys plus the background similarity of every row and of its trimmed view, as
    the encoder computes it (copyfree.background); unchanged without a bank. Not
    cached: it is a matrix product over keys already computed."""
    bank = BackgroundBank.load(bundle, read_manifest(bundle))
    if bank is None:
        return keys
    out = {**keys, "background": bank.similarity(keys["second_key"])}
    if "trimmed_second_key" in keys:
        out["trimmed_background"] = bank.similarity(keys["trimmed_second_key"])
    return out


# ----------------------------------------------------------------- distances


@dataclass(frozen=True)
class Codes:
    """One hasher's binary codes: every query, and every held-out image unmodified."""

    name: str
    bits: int
    query: (
        np.ndarray
    )  # (n_queries, bits) 0/1 (pdq8: (n_queries, 8, bits), orientations)
    ref: np.ndarray  # (n_images, bits): row i = code of image i unmodified

    def distances(self, rows: np.ndarray, refs: np.ndarray) -> np.ndarray:
        """(len(rows), len(refs)) Hamming distances, query rows vs reference rows."""
        r = self.ref[refs].astype(np.float32)
        q = self.query[rows].astype(np.float32)
        if q.ndim == 3:  # several orientations: the closest one
            d = [_hamming(q[:, o], r) for o in range(q.shape[1])]
            return np.min(d, axis=0)
        return _hamming(q, r)

    def pair(self, rows: np.ndarray, refs: np.ndarray) -> np.ndarray:
        """Distances of row i to ref i."""
        r = self.ref[refs].astype(np.int16)
        q = self.query[rows].astype(np.int16)
        if q.ndim == 3:
            return np.min(np.abs(q - r[:, None, :]).sum(axis=2), axis=1)
        return np.abs(q - r).sum(axis=1)


def _hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a @ (1 - b).T + (1 - a) @ b.T).round().astype(np.int32)


def build_codes(
    data: EvalData, raw: dict[str, dict[str, np.ndarray]]
) -> dict[str, Codes]:
    """Binary codes per hasher name (pdq also as pdq8, deep as deep64 and deep256)."""
    orig_row = original_rows(data)
    image_rows = np.array([orig_row[i] for i in range(len(data.records))])
    out: dict[str, Codes] = {}
    if "keys" in raw:
        b = unpack_bits(raw["keys"]["first_key"], 64)
        out["keys"] = Codes("keys", 64, b, b[image_rows])
    if "phash" in raw:
        b = unpack_bits(raw["phash"]["bits"], 64)
        out["phash"] = Codes("phash", 64, b, b[image_rows])
    if "pdq" in raw:
        dih = np.unpackbits(raw["pdq"]["dihedral"], axis=2)  # (n, 8, 256)
        b = dih[:, 0]
        out["pdq"] = Codes("pdq", 256, b, b[image_rows])
        out["pdq8"] = Codes("pdq8", 256, dih, b[image_rows])
    if "deep" in raw:
        feats = raw["deep"]["features"].astype(np.float64)
        mean = feats[[orig_row[i] for i in data.registered]].mean(axis=0)
        rng = np.random.default_rng(DEEP_SEED)
        planes = rng.standard_normal((feats.shape[1], 256))
        proj = (feats - mean) @ planes
        for bits in (64, 256):
            b = (proj[:, :bits] > 0).astype(np.uint8)
            out[f"deep{bits}"] = Codes(f"deep{bits}", bits, b, b[image_rows])
    return out


def original_rows(data: EvalData) -> dict[int, int]:
    """Image index -> the query row of that image unmodified."""
    return {q.image: j for j, q in enumerate(data.queries) if q.attack is None}


# ----------------------------------------------------------------- seed 004 metrics


def fp_threshold(
    d_diff: np.ndarray, bits: int, rate: float = FALSE_POSITIVE_RATE
) -> int:
    """Largest integer distance t with share(d_diff <= t) <= rate (-1: none)."""
    counts = np.bincount(d_diff.astype(np.int64), minlength=bits + 1)
    cum = np.cumsum(counts) / max(len(d_diff), 1)
    ok = np.flatnonzero(cum <= rate)
    return int(ok[-1]) if ok.size else -1


def f1(tp: int, fp: int, fn: int) -> float:
    denom = tp + 0.5 * (fp + fn)
    return float(tp / denom) if denom else 0.0


def seed004_metrics(data: EvalData, codes: Codes) -> dict[str, Any]:
    orig = original_rows(data)
    n = len(data.records)
    rows = np.array([orig[i] for i in range(n)])
    d = codes.distances(rows, np.arange(n))
    diff = d[np.triu_indices(n, 1)]
    if codes.query.ndim == 3:  # orientation matching is not symmetric: use both ways
        diff = np.concatenate([diff, d[np.tril_indices(n, -1)]])
    tau = fp_threshold(diff, codes.bits)
    L = codes.bits
    pos_rows = np.array(
        [j for j, q in enumerate(data.queries) if q.role == "positive" and q.attack]
    )
    images = np.array([data.queries[j].image for j in pos_rows])
    d_pos = codes.pair(pos_rows, images)
    d_neg = codes.pair(pos_rows, data.negatives[pos_rows])
    families = [data.queries[j].family for j in pos_rows]
    per: dict[str, dict[str, float]] = {}
    for fam in dict.fromkeys(families):
        m = np.array([f == fam for f in families])
        tp = int((d_pos[m] <= tau).sum())
        per[fam] = {
            "nhd_r_mean": float(d_pos[m].mean() / L),
            "nhd_r_std": float(d_pos[m].std() / L),
            "f1": f1(tp, int((d_neg[m] <= tau).sum()), int(m.sum()) - tp),
            "within_tau": float(tp / m.sum()),
            "copies": int(m.sum()),
        }
    seed = [f for f in A.SEED004_FAMILIES if f in per]
    return {
        "bits": L,
        "nhd_d_mean": float(diff.mean() / L),
        "nhd_d_std": float(diff.std() / L),
        "tau_bits": tau,
        "tau": tau / L,
        "fp_rate_at_tau": float((diff <= tau).mean()),
        "per_family": per,
        "avg25_nhd_r": float(np.mean([per[f]["nhd_r_mean"] for f in seed]))
        if seed
        else None,
        "avg25_f1": float(np.mean([per[f]["f1"] for f in seed])) if seed else None,
        "families_averaged": len(seed),
        "collision_rate": collision_rate(codes.ref),
    }


def collision_rate(bits: np.ndarray) -> float:
    """Seed 000 Table 4: images whose code equals another image's / images."""
    packed = np.packbits(bits.astype(bool), axis=1)
    _, inverse, counts = np.unique(
        packed, axis=0, return_inverse=True, return_counts=True
    )
    return float((counts[inverse.reshape(-1)] > 1).sum() / len(bits))


# ----------------------------------------------------------------- identification


def _groups(data: EvalData, rows: Sequence[int]) -> list[str]:
    return [data.queries[j].group for j in rows]


def identification_summary(
    data: EvalData, matched: Sequence[str | None], thresholds: dict[str, Any]
) -> dict[str, Any]:
    """Detection (right id) per group and family, wrong ids, false-match rates."""
    qs = data.queries
    right = np.array(
        [m is not None and m == q.truth for m, q in zip(matched, qs, strict=True)]
    )
    any_match = np.array([m is not None for m in matched])
    pos = np.array([q.role == "positive" for q in qs])
    groups = np.array([q.group for q in qs])
    families = np.array([q.family for q in qs])
    per_group = {
        g: float(right[pos & (groups == g)].mean())
        for g in GROUP_ORDER
        if (pos & (groups == g)).any()
    }
    per_family = {
        f: float(right[pos & (families == f)].mean())
        for f in dict.fromkeys(families[pos & (groups != "original")])
    }
    role = np.array([q.role for q in qs])
    return {
        "thresholds": thresholds,
        "detection": per_group,
        "detection_per_family": per_family,
        "wrong_id": float((any_match & ~right)[pos].mean()),
        "false_match_calibration": float(any_match[role == "calib"].mean()),
        "false_match_test": float(any_match[role == "test"].mean()),
        "false_match_test_unmodified": float(
            any_match[
                (role == "test") & np.array([q.attack is None for q in qs])
            ].mean()
        ),
    }


def nearest_identification(
    data: EvalData, codes: Codes, target_fmr: float
) -> tuple[dict[str, Any], list[tuple[float, float]]]:
    """Baseline 1:N rule: the nearest registered code (ties: smallest id) if within T;
    T = the largest distance whose false-match rate on the calibration distractors is
    <= target_fmr. Also the curve (false-match rate on test distractors, mean detection
    over attack groups) for every T."""
    reg = np.array(data.registered)
    rows = np.arange(len(data.queries))
    d = codes.distances(rows, reg)
    best = d.argmin(axis=1)  # registered are sorted by id: ties -> smallest id
    dmin = d[rows, best]
    ids = [data.records[reg[b]].item_id for b in best]
    role = np.array([q.role for q in data.queries])
    calib = role == "calib"
    t = -1
    for cand in range(codes.bits + 1):
        if (dmin[calib] <= cand).mean() <= target_fmr:
            t = cand
    matched = [i if dm <= t else None for i, dm in zip(ids, dmin, strict=True)]
    summary = identification_summary(data, matched, {"max_hamming": t})
    curve = []
    truth = np.array([q.truth or "" for q in data.queries], dtype=object)
    right_nn = np.array(ids, dtype=object) == truth
    groups = np.array([q.group for q in data.queries])
    test = role == "test"
    for cand in range(codes.bits + 1):
        within = dmin <= cand
        det = [
            float((within & right_nn)[groups == g].mean())
            for g in ("weak", "hybrid", "practical")
            if (groups == g).any()
        ]
        curve.append((float(within[test].mean()), float(np.mean(det))))
    return summary, curve


def keys_identification(
    data: EvalData, keys: dict[str, np.ndarray], bundle: Path, target_fmr: float
) -> tuple[
    dict[str, Any],
    dict[str, Any],
    Calibration,
    list[dict[str, Any]],
    dict[float, dict[str, Any]],
]:
    """(at the bundle's thresholds, at calibrated thresholds, the calibration, its
    frontier on the calibration distractors, summaries at OPERATING_POINTS)."""
    registry, q, _rows = calibration_queries(data, keys, bundle)
    manifest = read_manifest(bundle)
    every = query_keys(data, keys, np.arange(len(data.queries)))
    at_bundle = registry.detect_all(every, manifest.thresholds)
    bundle_summary = identification_summary(
        data, [v.matched for v in at_bundle], manifest.thresholds.to_dict()
    )
    bundle_summary["stages"] = _stage_counts(at_bundle)
    picks = collect_picks(registry, q)
    cal, front = calibrate(registry, q, target_fmr, picks=picks)
    at_cal = registry.detect_all(every, cal.thresholds)
    cal_summary = identification_summary(
        data, [v.matched for v in at_cal], cal.thresholds.to_dict()
    )
    cal_summary["stages"] = _stage_counts(at_cal)
    points = {}
    for target in OPERATING_POINTS:
        c, _ = calibrate(registry, q, target, picks=picks)
        verdicts = registry.detect_all(every, c.thresholds)
        points[target] = identification_summary(
            data, [v.matched for v in verdicts], c.thresholds.to_dict()
        )
    return bundle_summary, cal_summary, cal, front, points


def _stage_counts(verdicts: Sequence[Any]) -> dict[str, int]:
    from copyfree.v1 import gateway_pb2

    out: dict[str, int] = {}
    for v in verdicts:
        name = (
            gateway_pb2.DecisionStage.Name(v.stage)
            .removeprefix("DECISION_STAGE_")
            .lower()
        )
        out[name] = out.get(name, 0) + 1
    out["matched_by_trimmed_view"] = sum(v.trimmed for v in verdicts)
    return out


def query_keys(
    data: EvalData, keys: dict[str, np.ndarray], rows: np.ndarray
) -> Queries:
    """The keys (and trimmed-view keys, when computed) of the queries at rows."""
    qs = [data.queries[j] for j in rows]
    has = keys.get("trimmed")

    def part(name: str) -> np.ndarray | None:
        return keys[name][rows] if name in keys else None

    return Queries(
        keys["first_key"][rows],
        keys["second_key"][rows],
        [q.truth for q in qs],
        [q.group for q in qs],
        None if has is None else keys["trimmed_first_key"][rows],
        None if has is None else keys["trimmed_second_key"][rows],
        None if has is None else has[rows],
        background=part("background"),
        trimmed_background=part("trimmed_background"),
    )


def calibration_queries(
    data: EvalData, keys: dict[str, np.ndarray], bundle: Path
) -> tuple[Registry, Queries, np.ndarray]:
    """The registry of registered originals (real index shard) and the calibration
    queries: every positive plus the calibration distractors (never the test ones)."""
    manifest = read_manifest(bundle)
    orig = original_rows(data)
    reg_rows = [orig[i] for i in data.registered]
    registry = Registry(
        [data.records[i].item_id for i in data.registered],
        keys["first_key"][reg_rows],
        keys["second_key"][reg_rows],
        manifest.version,
    )
    rows = np.array(
        [j for j, q in enumerate(data.queries) if q.role in ("positive", "calib")]
    )
    return registry, query_keys(data, keys, rows), rows


# ----------------------------------------------------------------- the run


def evaluate(
    config: DetectEvalConfig,
) -> tuple[dict[str, Any], EvalData, dict[str, Codes]]:
    started = time.perf_counter()
    hashers = list(config.hashers)
    if "pdq" in hashers and not pdq_available():
        log.warning("pdqhash is not installed: PDQ left out (pip install pdqhash)")
        hashers.remove("pdq")
    data = prepare(config)
    log.info("split: %s", data.split_summary())
    raw = compute_codes(config, data, hashers)
    codes = build_codes(data, raw)
    result: dict[str, Any] = {
        "bundle": read_manifest(config.bundle).version,
        "config": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in ((f.name, getattr(config, f.name)) for f in fields(config))
        },
        "split": data.split_summary(),
        "attacks": {g: sum(a.group == g for a in A.suite()) for g in A.GROUPS},
        "seed004": {},
        "identification": {},
        "operating_points": {},
        "curves": {},
    }
    for name, c in codes.items():
        result["seed004"][name] = seed004_metrics(data, c)
        if name == "keys":
            continue
        summary, curve = nearest_identification(data, c, config.target_fmr)
        result["identification"][name] = summary
        result["curves"][name] = curve
        result["operating_points"][name] = {
            t: nearest_identification(data, c, t)[0] for t in OPERATING_POINTS
        }
    if "keys" in raw:
        at_bundle, at_cal, cal, front, points = keys_identification(
            data,
            with_background(raw["keys"], config.bundle),
            config.bundle,
            config.target_fmr,
        )
        result["operating_points"]["keys"] = points
        result["identification"]["keys@bundle"] = at_bundle
        result["identification"]["keys@calibrated"] = at_cal
        result["calibration"] = cal.to_dict()
        result["curves"]["keys (frontier, calib. distractors)"] = [
            (r["fmr"], r["detection"]) for r in front
        ]
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result, data, codes


# ----------------------------------------------------------------- report


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


TARGETS = (
    ("average F1 over the 25 seed-004 attacks", ">= 0.95 and above PDQ and deep"),
    ("weak-attack copies REGISTERED (right id) at 1 % false matches", ">= 0.85"),
    ("hybrid-attack copies", ">= 0.60"),
    ("practical edits", ">= 0.85"),
    ("unmodified registered images", "1.00"),
    ("first-key collision rate", "<= 0.003"),
)


def render_markdown(r: dict[str, Any]) -> str:
    s4 = r["seed004"]
    names = list(s4)

    def row(label: str, fmt: str, key: str) -> str:
        return (
            f"| {label} | " + " | ".join(fmt.format(s4[n][key]) for n in names) + " |"
        )

    lines = [
        f"# Detection report: {r['bundle']}",
        "",
        f"Split (held-out images only): {json.dumps(r['split'])}. Attack variants: "
        f"{json.dumps(r['attacks'])}; {r['config']['per_attack']} copies per variant. "
        f"Run time {r['seconds']} s.",
        "",
        "## Seed 004 protocol (pairwise)",
        "",
        "| | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
        row("bits", "{}", "bits"),
        row("NHD_d mean", "{:.4f}", "nhd_d_mean"),
        row("NHD_d std", "{:.4f}", "nhd_d_std"),
        row("tau (1 % FP)", "{:.4f}", "tau"),
        row("avg NHD_r (25)", "{:.4f}", "avg25_nhd_r"),
        row("**avg F1 (25)**", "**{:.3f}**", "avg25_f1"),
        row("collision rate", "{:.4f}", "collision_rate"),
        "",
        "Per attack family: NHD_r mean (std) / F1 at tau.",
        "",
        "| family | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    families = list(next(iter(s4.values()))["per_family"])
    for fam in families:
        cells = []
        for n in names:
            p = s4[n]["per_family"][fam]
            cells.append(
                f"{p['nhd_r_mean']:.3f} ({p['nhd_r_std']:.3f}) / {p['f1']:.2f}"
            )
        lines.append(f"| {fam} | " + " | ".join(cells) + " |")
    ident = r["identification"]
    inames = list(ident)
    lines += [
        "",
        "## Identification (1:N, registered originals vs distractors)",
        "",
        "keys (the bundle's detection keys): the real index Detect + gateway "
        "decision, thresholds T1/T2/K/require_second_key/trimmed_view (trimmed_view: "
        "a query that matches nothing as is is searched again with its uniform "
        "border trimmed); baselines: nearest registered code within a Hamming "
        "threshold T. "
        "Calibrated = fitted on the calibration "
        f"distractors to a false-match rate <= {r['config']['target_fmr']}; false "
        "matches below are measured on the *test* distractors. Detection = share of "
        "copies REGISTERED with the right id (%).",
        "",
        "| | " + " | ".join(inames) + " |",
        "|---|" + "---:|" * len(inames),
        "| thresholds | "
        + " | ".join(
            "/".join(str(v) for v in ident[n]["thresholds"].values()) for n in inames
        )
        + " |",
    ]
    for g in GROUP_ORDER:
        lines.append(
            f"| {g} | "
            + " | ".join(_pct(ident[n]["detection"].get(g)) for n in inames)
            + " |"
        )
    lines += [
        "| wrong id | " + " | ".join(_pct(ident[n]["wrong_id"]) for n in inames) + " |",
        "| false match, calib. distractors | "
        + " | ".join(_pct(ident[n]["false_match_calibration"]) for n in inames)
        + " |",
        "| false match, test distractors | "
        + " | ".join(_pct(ident[n]["false_match_test"]) for n in inames)
        + " |",
        "",
        "Detection per attack family (%, calibrated thresholds):",
        "",
        "| family | " + " | ".join(n for n in inames if n != "keys@bundle") + " |",
        "|---|" + "---:|" * (len(inames) - ("keys@bundle" in ident)),
    ]
    for fam in ident[inames[0]]["detection_per_family"]:
        lines.append(
            f"| {fam} | "
            + " | ".join(
                _pct(ident[n]["detection_per_family"].get(fam))
                for n in inames
                if n != "keys@bundle"
            )
            + " |"
        )
    ops = r.get("operating_points", {})
    if ops:
        lines += [
            "",
            "Trade-off: thresholds calibrated to each false-match target on the "
            "calibration distractors; detection weak / hybrid / practical (%) and the "
            "false-match rate on the test distractors (%).",
            "",
            "| | "
            + " | ".join(f"target {100 * t:g} %" for t in OPERATING_POINTS)
            + " |",
            "|---|" + "---|" * len(OPERATING_POINTS),
        ]
        for n, pts in ops.items():
            cells = []
            for t in OPERATING_POINTS:
                p = pts[t]
                det = p["detection"]
                cells.append(
                    " / ".join(
                        _pct(det.get(g)) for g in ("weak", "hybrid", "practical")
                    )
                    + f"; fm {_pct(p['false_match_test'])}"
                )
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
    if "calibration" in r:
        lines += [
            "",
            "Calibration of the bundle: `" + json.dumps(r["calibration"]) + "`",
        ]
    lines += [
        "",
        "![DET](img/detect-det.png)",
        "",
        "![per attack](img/detect-attacks.png)",
        "",
    ]
    return "\n".join(lines)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_det(
    data: EvalData, codes: dict[str, Codes], r: dict[str, Any], path: Path
) -> None:
    """Left: pairwise DET (seed 004: FP over pairs of different originals, FN over
    original/copy pairs of the 25 families). Right: 1:N detection vs false matches."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.6))
    orig = original_rows(data)
    n = len(data.records)
    rows = np.array([orig[i] for i in range(n)])
    pos_rows = np.array(
        [
            j
            for j, q in enumerate(data.queries)
            if q.attack and q.family in A.SEED004_FAMILIES
        ]
    )
    for name, c in codes.items():
        d = c.distances(rows, np.arange(n))
        diff = d[np.triu_indices(n, 1)]
        d_pos = c.pair(pos_rows, np.array([data.queries[j].image for j in pos_rows]))
        ts = np.arange(c.bits + 1)
        fpr = np.array([(diff <= t).mean() for t in ts])
        fnr = np.array([(d_pos > t).mean() for t in ts])
        a.plot(np.maximum(fpr, 1e-5), np.maximum(fnr, 1e-5), label=name, lw=1.5)
    a.set(
        xscale="log",
        yscale="log",
        xlabel="false positive rate (different-image pairs)",
        ylabel="miss rate (attacked copies, 25 seed-004 attacks)",
        title="pairwise DET",
    )
    a.axvline(FALSE_POSITIVE_RATE, color="grey", ls=":", lw=1)
    a.grid(alpha=0.3, which="both")
    a.legend(fontsize=8)
    for name, curve in r["curves"].items():
        xs, ys = zip(*curve, strict=True)
        b.plot(
            np.maximum(xs, 1e-4),
            ys,
            label=name,
            lw=1.5,
            marker="." if "keys" in name else None,
        )
    b.axvline(r["config"]["target_fmr"], color="grey", ls=":", lw=1)
    b.set(
        xscale="log",
        xlabel="false-match rate on distractors",
        ylabel="copies REGISTERED with right id (mean of groups)",
        title="1:N identification",
    )
    b.grid(alpha=0.3, which="both")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_attacks(r: dict[str, Any], path: Path) -> None:
    plt = _plt()
    s4 = r["seed004"]
    names = list(s4)
    fams = [f for f in A.SEED004_FAMILIES if f in next(iter(s4.values()))["per_family"]]
    ident = {k: v for k, v in r["identification"].items() if k != "keys@bundle"}
    all_fams = list(next(iter(ident.values()))["detection_per_family"]) if ident else []
    fig, (a, b) = plt.subplots(2, 1, figsize=(max(12, 0.45 * len(all_fams)), 8))
    width = 0.8 / max(len(names), 1)
    x = np.arange(len(fams))
    for k, n in enumerate(names):
        a.bar(
            x + k * width, [s4[n]["per_family"][f]["f1"] for f in fams], width, label=n
        )
    a.set_xticks(x + 0.4 - width / 2, fams, fontsize=8)
    a.set(ylabel="F1 at 1 % FP (pairs)", title="seed-004 F1 per attack", ylim=(0, 1.05))
    a.legend(fontsize=7, ncol=len(names))
    width = 0.8 / max(len(ident), 1)
    x = np.arange(len(all_fams))
    for k, (n, v) in enumerate(ident.items()):
        b.bar(
            x + k * width,
            [v["detection_per_family"][f] for f in all_fams],
            width,
            label=n,
        )
    b.set_xticks(x + 0.4 - width / 2, all_fams, fontsize=7, rotation=60)
    b.set(
        ylabel="REGISTERED, right id",
        title="1:N detection per attack (calibrated)",
        ylim=(0, 1.05),
    )
    b.legend(fontsize=7, ncol=len(ident))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(config: DetectEvalConfig) -> dict[str, Any]:
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    result, data, codes = evaluate(config)
    (out / "report.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "report.md").write_text(render_markdown(result))
    plot_det(data, codes, result, out / "detect-det.png")
    plot_attacks(result, out / "detect-attacks.png")
    if config.figures is not None:
        Path(config.figures).mkdir(parents=True, exist_ok=True)
        for f in ("detect-det.png", "detect-attacks.png"):
            shutil.copy(out / f, Path(config.figures) / f)
    return result


# ----------------------------------------------------------------- CLI


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=Path, required=True, help="the image folder")
    p.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    p.add_argument("--registered", type=int, default=300)
    p.add_argument(
        "--per-attack", type=int, default=10, help="copies per attack variant"
    )
    p.add_argument("--limit", type=int, default=None, help="max held-out images used")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--threads", type=int, default=2)


def config_from_args(args: argparse.Namespace, **over: Any) -> DetectEvalConfig:
    names = {f.name for f in fields(DetectEvalConfig)}
    kw = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return replace(DetectEvalConfig(images=args.images), **{**kw, **over})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="copyfree eval detect",
        description="Detection report: seed-004 NHD/F1 per attack, 1:N identification "
        "through the real index and decision, collisions; vs pHash, PDQ, deep codes.",
    )
    add_data_args(p)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--figures", type=Path, default=None, help="copy the PNGs here")
    p.add_argument("--hashers", default=",".join(HASHERS), help="comma-separated")
    p.add_argument("--target-fmr", type=float, default=0.01)
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    hashers = tuple(h for h in args.hashers.split(",") if h)
    config = config_from_args(args, hashers=hashers)
    result = run(config)
    print((Path(config.out) / "report.md").read_text())  # noqa: T201 (the report)
    log.info("report in %s (%.0f s)", config.out, result["seconds"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
