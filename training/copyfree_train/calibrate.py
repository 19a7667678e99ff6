"""Identification the way the product does it, and threshold calibration.

Owns:
- `Registry`: registered originals in a real index shard (copyfree_index.shard, the
  code the index service runs), queried with the shard's Detect and judged by the
  gateway's decision rule (copyfree_gateway.decision.decide), in process. Nothing of
  the two-stage search is reimplemented here.
- `calibrate`: picks (T1, T2, K, whether a unique stage-1 candidate must also
  reach T2, and whether to search the border-trimmed view) for a target
  false-match rate on never-registered distractors. For each T1 on the grid and
  each query it runs the real Detect once (with the largest K) and the real
  decision once per K with T2 = -1, which yields the candidate the rule would pick
  and its cosine; the decision for any T2 then follows from decide()'s own rule
  (a unique stage-1 candidate is the answer whatever its cosine unless
  require_second_key; otherwise the pick must reach T2), so the T2 and
  require_second_key axes cost no further searches. Queries that carry the keys of
  their border-trimmed view get the same picks for that view, and the trimmed_view
  axis combines the two as the gateway does (the view answers only where the image
  as is matched nothing). Where the bundle has a background bank
  (copyfree.background), a background_weight axis raises each query's bar by its
  background similarity, again without another search.
  Among settings whose distractor false-match rate is <= target and which keep every
  unmodified registered image REGISTERED with its id, it takes the one with the best
  mean detection over the attack groups (ties: fewer false matches, then the stricter
  setting, then one search rather than two).
- `write_thresholds`: writes the chosen thresholds into a bundle's manifest.json, with
  the calibration's provenance. The bundle's version is kept: it names the weights
  and keys (collections are bound to it), which calibration does not change.
- `copyfree calibrate` (main): the split, attacked copies and distractors of
  `copyfree eval detect`, then calibrate and (with --write) update the manifest.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from copyfree.bundle import Thresholds, read_manifest, write_manifest
from copyfree.v1 import common_pb2, gateway_pb2, index_pb2
from copyfree_gateway.decision import decide, with_trimmed_view
from copyfree_index.shard import (
    CollectionSpec,
    DetectHit,
    ItemBatch,
    ModelRef,
    ShardIndex,
)

log = logging.getLogger(__name__)

COLLECTION = "eval-registry"
MAX_CANDIDATES = 100  # the index service's default cap on stage-1 candidates
UNIQUE = gateway_pb2.DECISION_STAGE_UNIQUE_FIRST_KEY
T1_GRID = tuple(range(0, 25))
K_GRID = (0, 1, 4, 16, 64)
R_GRID = (False, True)  # require_second_key
V_GRID = (False, True)  # trimmed_view (only where the queries have trimmed keys)
# background_weight (only where the bundle has a background bank)
B_GRID = (0.0, 0.1, 0.2, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6)
T2_GRID = tuple(
    round(float(v), 4)
    for v in np.concatenate(
        [
            np.arange(0.30, 0.95, 0.005),
            np.arange(0.95, 0.99, 0.0025),
            np.arange(0.99, 1.0, 0.0005),
        ]
    )
)


@dataclass(frozen=True)
class Verdict:
    """One Detect answer: the matched id (None: UNVERIFIED), stage and evidence."""

    matched: str | None
    stage: int
    hamming: int
    cosine: float
    trimmed: bool = False  # the answer came from the image with its border trimmed


class Registry:
    """Registered originals in one real index shard, searched with its Detect."""

    def __init__(
        self,
        ids: Sequence[str],
        first_keys: np.ndarray,
        second_keys: np.ndarray,
        model_version: str = "eval",
    ) -> None:
        self.model = ModelRef("detect", model_version)
        self.shard = ShardIndex()
        spec = CollectionSpec.registry(COLLECTION, self.model)
        self.shard.upsert(
            spec,
            ItemBatch.of(
                list(ids),
                np.ascontiguousarray(first_keys, dtype=np.uint8),
                np.ascontiguousarray(second_keys, dtype=np.int16),
            ),
        )

    def search(
        self, first_key: np.ndarray, second_key: np.ndarray, max_hamming: int, k: int
    ) -> index_pb2.DetectResponse:
        """The shard's Detect, as the index service answers it."""
        res = self.shard.detect(
            COLLECTION,
            self.model,
            np.asarray(first_key, np.uint8).tobytes(),
            np.asarray(second_key).astype("<i2").tobytes(),
            max_hamming,
            k,
            MAX_CANDIDATES,
        )
        return index_pb2.DetectResponse(
            candidates=[_candidate(h) for h in res.candidates],
            stage1_count=res.stage1_count,
            nearest=[_candidate(h) for h in res.nearest],
            searched=res.searched,
        )

    def detect(
        self,
        first_key: np.ndarray,
        second_key: np.ndarray,
        t: Thresholds,
        trimmed: tuple[np.ndarray, np.ndarray, float] | None = None,
        background: float = 0.0,
    ) -> Verdict:
        """Detect + the gateway's decision at thresholds t; with t.trimmed_view, the
        trimmed view's keys (first, second, background) are searched when the image
        matches nothing, as the gateway's Check does."""
        proto = _proto(t)

        def decision(a: np.ndarray, b: np.ndarray, bg: float) -> Any:
            resp = self.search(a, b, t.max_hamming, t.fallback_k)
            return decide(
                [resp],
                proto,
                require_second_key=proto.require_second_key,
                background=_f32(bg),
            )

        as_is = decision(first_key, second_key, background)
        view = None
        if as_is.matched is None and t.trimmed_view and trimmed is not None:
            view = decision(*trimmed)
        d, used = with_trimmed_view(as_is, view)
        return _verdict(d, used)

    def detect_all(self, q: Queries, t: Thresholds) -> list[Verdict]:
        return [
            self.detect(*q.keys(i), t, q.trimmed_keys(i), q.background_of(i))
            for i in range(len(q))
        ]


def _f32(v: float) -> float:
    """v as the float32 a proto field carries (the gateway sees that value)."""
    return float(np.float32(v))


def _candidate(h: DetectHit) -> index_pb2.DetectCandidate:
    return index_pb2.DetectCandidate(id=h.id, hamming=h.hamming, cosine=h.cosine)


def _proto(t: Thresholds) -> common_pb2.Thresholds:
    return common_pb2.Thresholds(**t.to_dict())


def _verdict(d: Any, trimmed: bool) -> Verdict:
    if d.matched is None:
        best = d.top[0] if d.top else None
        return Verdict(
            None, d.stage, best.hamming if best else -1, best.cosine if best else -2.0
        )
    return Verdict(d.matched.id, d.stage, d.matched.hamming, d.matched.cosine, trimmed)


# ----------------------------------------------------------------- calibration


@dataclass
class Queries:
    """Keys of query images: positives (attacked or unmodified copies of registered
    items, with the id they should match and their group) and distractors."""

    first_keys: np.ndarray  # (n, 8) uint8
    second_keys: np.ndarray  # (n, 64) int16
    truth: list[str | None]  # registered id, None for a distractor
    groups: list[str]  # "original", "weak", "hybrid", "practical", "distractor"
    # Keys of each image with its uniform border trimmed, where it has one.
    trimmed_first_keys: np.ndarray | None = None  # (n, 8); rows where has_trimmed
    trimmed_second_keys: np.ndarray | None = None  # (n, 64)
    has_trimmed: np.ndarray | None = None  # (n,) bool
    # Background similarity of each query and of its trimmed view (copyfree.background;
    # None: the bundle has no bank).
    background: np.ndarray | None = None  # (n,) float32
    trimmed_background: np.ndarray | None = None  # (n,) float32

    def __len__(self) -> int:
        return len(self.truth)

    def keys(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.first_keys[i], self.second_keys[i]

    def background_of(self, i: int) -> float:
        return 0.0 if self.background is None else float(self.background[i])

    def trimmed_keys(self, i: int) -> tuple[np.ndarray, np.ndarray, float] | None:
        if self.has_trimmed is None or not self.has_trimmed[i]:
            return None
        assert self.trimmed_first_keys is not None
        assert self.trimmed_second_keys is not None
        bg = self.trimmed_background
        return (
            self.trimmed_first_keys[i],
            self.trimmed_second_keys[i],
            0.0 if bg is None else float(bg[i]),
        )

    def trimmed_view(self) -> Queries | None:
        """The queries with their trimmed keys (rows without a border: no keys)."""
        if self.has_trimmed is None:
            return None
        assert self.trimmed_first_keys is not None
        assert self.trimmed_second_keys is not None
        return Queries(
            self.trimmed_first_keys,
            self.trimmed_second_keys,
            self.truth,
            self.groups,
            background=self.trimmed_background,
        )


@dataclass
class Picks:
    """Per (T1, K), for each query, what the rule picks with T2 = -1: whether it
    picked anything, whether that is the query's true id, its cosine, and whether
    stage 1 had exactly one candidate (then T2 does not apply). `trimmed`: the same
    for the queries' trimmed keys (has = False where a query has none). `background`:
    each query's background similarity (zeros without a bank)."""

    has: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    right: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    cos: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    unique: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    trimmed: Picks | None = None
    background: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))

    def matched(
        self,
        key: tuple[int, int],
        t2s: np.ndarray,
        require_second_key: bool,
        background_weight: float = 0.0,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(matched anything, matched the right id), (queries, len(t2s)), by
        decide()'s rule: a unique stage-1 candidate is the answer unless
        require_second_key; any other pick's cosine must reach T2 + background_weight *
        the query's background (in double, from the float32 values the protos carry,
        as decide() computes it)."""
        unique = self.unique[key] & (not require_second_key)
        bar = np.float32(t2s).astype(np.float64)[None, :]
        if background_weight:
            bg = self.background.astype(np.float64)[:, None]
            bar = bar + float(np.float32(background_weight)) * bg
        matched = self.has[key][:, None] & (
            unique[:, None] | (self.cos[key].astype(np.float64)[:, None] >= bar)
        )
        return matched, matched & self.right[key][:, None]

    def outcomes(
        self,
        key: tuple[int, int],
        t2s: np.ndarray,
        require_second_key: bool,
        trimmed_view: bool,
        background_weight: float = 0.0,
    ) -> tuple[np.ndarray, np.ndarray]:
        """matched() with the gateway's view rule: the trimmed view answers where the
        image as is matched nothing (copyfree_gateway.decision.with_trimmed_view)."""
        matched, right = self.matched(key, t2s, require_second_key, background_weight)
        if trimmed_view and self.trimmed is not None:
            m2, r2 = self.trimmed.matched(
                key, t2s, require_second_key, background_weight
            )
            use = ~matched & m2
            matched, right = matched | use, right | (use & r2)
        return matched, right


def collect_picks(
    registry: Registry,
    q: Queries,
    t1_grid: Sequence[int] = T1_GRID,
    k_grid: Sequence[int] = K_GRID,
    searched: np.ndarray | None = None,
) -> Picks:
    """Picks of every query (of those where `searched` is True; the rest pick
    nothing), and of the queries' trimmed view where they have one."""
    n = len(q.truth)
    bg = np.zeros(n, np.float32) if q.background is None else q.background
    picks = Picks(background=np.asarray(bg, np.float32))
    kmax = max(k_grid)
    view = q.trimmed_view()
    if view is not None:
        picks.trimmed = collect_picks(registry, view, t1_grid, k_grid, q.has_trimmed)
    rows = range(n) if searched is None else np.flatnonzero(searched)
    for t1 in t1_grid:
        for k in k_grid:
            picks.has[(t1, k)] = np.zeros(n, bool)
            picks.right[(t1, k)] = np.zeros(n, bool)
            picks.cos[(t1, k)] = np.full(n, -2.0, np.float32)
            picks.unique[(t1, k)] = np.zeros(n, bool)
        for i in rows:
            resp = registry.search(q.first_keys[i], q.second_keys[i], t1, kmax)
            for k in k_grid:
                t = common_pb2.Thresholds(max_hamming=t1, min_cosine=-1.0, fallback_k=k)
                d = decide([resp], t)
                if d.matched is not None:
                    picks.has[(t1, k)][i] = True
                    picks.right[(t1, k)][i] = d.matched.id == q.truth[i]
                    picks.cos[(t1, k)][i] = d.matched.cosine
                    picks.unique[(t1, k)][i] = d.stage == UNIQUE
    return picks


def outcomes(picks: Picks, t: Thresholds) -> tuple[np.ndarray, np.ndarray]:
    """(matched anything, matched the right id) per query at thresholds t, from the
    T2 = -1 picks (Picks.outcomes). (The pick itself depends on neither T2 nor
    require_second_key.)"""
    matched, right = picks.outcomes(
        (t.max_hamming, t.fallback_k),
        np.asarray([t.min_cosine], np.float32),
        t.require_second_key,
        t.trimmed_view,
        t.background_weight,
    )
    return matched[:, 0], right[:, 0]


@dataclass(frozen=True)
class Calibration:
    thresholds: Thresholds
    target_fmr: float
    false_match_rate: float
    detection: dict[str, float]  # per group, right id
    distractors: int
    positives: int
    feasible: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "thresholds": self.thresholds.to_dict(),
            "target_false_match_rate": self.target_fmr,
            "false_match_rate": round(self.false_match_rate, 5),
            "detection": {g: round(v, 4) for g, v in self.detection.items()},
            "distractor_queries": self.distractors,
            "positive_queries": self.positives,
            "feasible": self.feasible,
        }


def score(picks: Picks, q: Queries, t: Thresholds) -> tuple[float, dict[str, float]]:
    """(false-match rate on distractors, right-id detection per positive group)."""
    matched, right = outcomes(picks, t)
    groups = np.asarray(q.groups)
    neg = groups == "distractor"
    fmr = float(matched[neg].mean()) if neg.any() else 0.0
    det = {
        g: float(right[groups == g].mean())
        for g in dict.fromkeys(q.groups)
        if g != "distractor"
    }
    return fmr, det


def calibrate(
    registry: Registry,
    q: Queries,
    target_fmr: float,
    t1_grid: Sequence[int] = T1_GRID,
    k_grid: Sequence[int] = K_GRID,
    t2_grid: Sequence[float] = T2_GRID,
    picks: Picks | None = None,
    r_grid: Sequence[bool] = R_GRID,
    b_grid: Sequence[float] = B_GRID,
) -> tuple[Calibration, list[dict[str, Any]]]:
    """The best (T1, T2, K, require_second_key, trimmed_view, background_weight) at
    false-match rate <= target_fmr (see the module doc), and the frontier (best
    detection at each false-match rate seen) for plotting. Scores every T2 of the grid
    at once."""
    picks = picks or collect_picks(registry, q, t1_grid, k_grid)
    attack_groups = [
        g for g in dict.fromkeys(q.groups) if g not in ("distractor", "original")
    ]
    groups = np.asarray(q.groups)
    neg = groups == "distractor"
    masks = {g: groups == g for g in dict.fromkeys(q.groups) if g != "distractor"}
    t2s = np.asarray(t2_grid, np.float32)
    best: tuple[Any, ...] | None = None
    fallback: tuple[Any, ...] | None = None
    seen: list[tuple[Thresholds, np.ndarray, np.ndarray]] = []  # (setting, fmrs, means)
    v_grid = V_GRID if picks.trimmed is not None else (False,)
    weights = b_grid if q.background is not None else (0.0,)
    for t1, k, req, view, w in itertools.product(
        t1_grid, k_grid, r_grid, v_grid, weights
    ):
        # outcomes for every T2 at once: (queries, len(t2_grid))
        matched, right = picks.outcomes((t1, k), t2s, req, view, w)
        fmrs = matched[neg].mean(axis=0) if neg.any() else np.zeros(len(t2s))
        dets = {g: right[m].mean(axis=0) for g, m in masks.items()}
        means = (
            np.mean([dets[g] for g in attack_groups], axis=0)
            if attack_groups
            else np.zeros(len(t2s))
        )
        setting = Thresholds(t1, 0.0, k, req, view, w)
        seen.append((setting, fmrs, means))
        # Within one setting only T2 varies: the best T2 by (detection, fewer false
        # matches, stricter T2); across settings the rank below decides.
        ok = fmrs <= target_fmr
        if "original" in dets:
            ok &= dets["original"] >= 1.0
        order = np.lexsort((t2s, -fmrs, means))  # last key first: best is last
        feasible = order[ok[order]]
        # larger = better: detection, fewer false matches, stricter rule, the plain
        # cosine rather than the background-weighted one, stricter T2, and (all else
        # equal) one search rather than two
        if len(feasible):
            j = int(feasible[-1])
            rank = (means[j], -fmrs[j], req, -w, t2s[j], -t1, -k, not view)
            if best is None or rank > best[0]:
                best = (rank, setting, j, dets)
        j = int(np.lexsort((t2s, means, -fmrs))[-1])
        frank = (-fmrs[j], means[j], req, -w, t2s[j], -t1, -k, not view)
        if fallback is None or frank > fallback[0]:
            fallback = (frank, setting, j, dets)
    chosen, feasible_any = (best, True) if best is not None else (fallback, False)
    assert chosen is not None
    rank, setting, j, dets = chosen
    t = replace(setting, min_cosine=float(t2_grid[j]))
    det = {g: float(v[j]) for g, v in dets.items()}
    cal = Calibration(
        t, target_fmr, float(-rank[1] if feasible_any else -rank[0]), det,
        int((groups == "distractor").sum()), int((groups != "distractor").sum()),
        feasible_any,
    )  # fmt: skip
    return cal, frontier(seen, t2_grid)


def frontier(
    seen: Sequence[tuple[Thresholds, np.ndarray, np.ndarray]],
    t2_grid: Sequence[float],
) -> list[dict[str, Any]]:
    """Pareto front: for each false-match rate, the best detection at or below it
    (rows: the setting's thresholds, "fmr" and "detection")."""
    fmr = np.concatenate([f for _, f, _ in seen])
    det = np.concatenate([m for _, _, m in seen])
    order = np.lexsort((-det, fmr))
    front: list[dict[str, Any]] = []
    best = -np.inf
    for i in order:
        if det[i] > best:
            best = det[i]
            setting = seen[i // len(t2_grid)][0]
            t = replace(setting, min_cosine=float(t2_grid[i % len(t2_grid)]))
            front.append(
                {**t.to_dict(), "fmr": float(fmr[i]), "detection": float(det[i])}
            )
    return front


def write_thresholds(
    bundle: Path, cal: Calibration, provenance: dict[str, Any]
) -> Path:
    """Write cal.thresholds into bundle/manifest.json (format and version unchanged;
    the calibration's numbers and provenance under "calibration")."""
    manifest = read_manifest(bundle)
    extra = dict(manifest.extra)
    extra["calibration"] = {
        **cal.to_dict(),
        **provenance,
        "date": dt.date.today().isoformat(),
        "previous_thresholds": manifest.thresholds.to_dict(),
    }
    return write_manifest(
        Path(bundle), replace(manifest, thresholds=cal.thresholds, extra=extra)
    )


# ----------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    from copyfree_train import eval_detect

    p = argparse.ArgumentParser(
        prog="copyfree calibrate",
        description="Pick detection thresholds (T1, T2, K) for a target false-match "
        "rate on never-registered distractors; --write puts them into the bundle.",
    )
    eval_detect.add_data_args(p)
    p.add_argument("--target-fmr", type=float, default=0.01)
    p.add_argument("--write", action="store_true", help="update the bundle manifest")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    config = eval_detect.config_from_args(args, hashers=("keys",))
    data = eval_detect.prepare(config)
    keys = eval_detect.bundle_keys(config, data)
    registry, q, _ = eval_detect.calibration_queries(data, keys, config.bundle)
    cal, _ = calibrate(registry, q, args.target_fmr)
    result = {
        "bundle": str(config.bundle),
        **cal.to_dict(),
        "split": data.split_summary(),
    }
    text = json.dumps(result, indent=2)
    print(text)  # noqa: T201 (the command's output)
    if args.json:
        args.json.write_text(text + "\n")
    if not cal.feasible:
        log.error(
            "no setting reaches false-match rate %.4f; manifest left alone",
            args.target_fmr,
        )
        return 1
    if args.write:
        path = write_thresholds(
            config.bundle,
            cal,
            {
                "tool": "copyfree calibrate",
                "images": str(config.images),
                "registered": len(data.registered),
                "calibration_distractor_images": len(data.calib_distractors),
                "copies_per_attack": config.per_attack,
            },
        )
        log.info("thresholds %s written to %s", cal.thresholds.to_dict(), path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
