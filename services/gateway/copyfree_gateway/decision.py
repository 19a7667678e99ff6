"""The global detection rule (DESIGN.md §3) and the merge of per-shard answers. Pure:
shards report candidates with distances; only this module decides."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from copyfree.v1 import common_pb2, gateway_pb2, index_pb2

TOP_CANDIDATES_REPORTED = 5


@dataclass(frozen=True)
class Decision:
    matched: index_pb2.DetectCandidate | None
    stage: int  # gateway_pb2.DecisionStage value
    stage1_count: int
    stage2_count: int
    top: list[index_pb2.DetectCandidate] = field(default_factory=list)


def _by_cosine(c: index_pb2.DetectCandidate) -> tuple[float, int, str]:
    return (-c.cosine, c.hamming, c.id)


def _by_hamming(c: index_pb2.DetectCandidate) -> tuple[int, str]:
    return (c.hamming, c.id)


def decide(
    responses: Sequence[index_pb2.DetectResponse],
    thresholds: common_pb2.Thresholds,
    *,
    require_second_key: bool = False,
    background: float = 0.0,
) -> Decision:
    """Stage 1: C = items within max_hamming over all shards. |C| = 1 -> that item (the
    paper rule) unless require_second_key. |C| > 1 -> highest cosine, if it passes
    stage 2. |C| = 0 -> stage 2 over the fallback_k nearest first keys (K = 0: no
    match). Stage 2: cosine - background_weight * background >= min_cosine, where
    `background` is the query's background similarity (copyfree.background)."""
    # The candidate ranking is by cosine; the query's background only moves the bar.
    bar = thresholds.min_cosine + thresholds.background_weight * background
    stage1_count = sum(r.stage1_count for r in responses)
    if stage1_count > 0:
        candidates = sorted(
            (c for r in responses for c in r.candidates), key=_by_cosine
        )
        top = candidates[:TOP_CANDIDATES_REPORTED]
        if stage1_count == 1 and not require_second_key:
            return Decision(
                candidates[0], gateway_pb2.DECISION_STAGE_UNIQUE_FIRST_KEY, 1, 0, top
            )
        best = candidates[0]
        matched = best if best.cosine >= bar else None
        return Decision(
            matched,
            gateway_pb2.DECISION_STAGE_SECOND_KEY,
            stage1_count,
            stage1_count,
            top,
        )
    nearest = sorted((c for r in responses for c in r.nearest), key=_by_hamming)
    nearest = nearest[: thresholds.fallback_k]
    if not nearest:
        return Decision(None, gateway_pb2.DECISION_STAGE_NO_CANDIDATE, 0, 0, [])
    ranked = sorted(nearest, key=_by_cosine)
    best = ranked[0]
    matched = best if best.cosine >= bar else None
    return Decision(
        matched,
        gateway_pb2.DECISION_STAGE_FALLBACK,
        0,
        len(nearest),
        ranked[:TOP_CANDIDATES_REPORTED],
    )


def with_trimmed_view(
    as_is: Decision, trimmed: Decision | None
) -> tuple[Decision, bool]:
    """The image as is decides, unless it matched nothing and the image with its
    uniform border trimmed did: then that decision, and True."""
    if as_is.matched is None and trimmed is not None and trimmed.matched is not None:
        return trimmed, True
    return as_is, False


def merge_similar(
    responses: Iterable[index_pb2.SimilarResponse], top_n: int
) -> list[index_pb2.SimilarHit]:
    """Global top_n by (hamming asc, fine_cosine desc, id asc): the order every shard
    uses, so the merge equals a single-shard search."""
    hits = [h for r in responses for h in r.hits]
    hits.sort(key=lambda h: (h.hamming, -h.fine_cosine, h.id))
    return hits[:top_n]
