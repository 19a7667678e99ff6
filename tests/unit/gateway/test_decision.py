"""The global detection rule and the shard merge, on hand-made shard answers."""

from __future__ import annotations

import numpy as np

from copyfree.v1 import common_pb2, gateway_pb2, index_pb2
from copyfree_gateway.decision import decide, merge_similar, with_trimmed_view

T = common_pb2.Thresholds(max_hamming=12, min_cosine=0.9, fallback_k=16)


def cand(id_: str, h: int, cos: float) -> index_pb2.DetectCandidate:
    return index_pb2.DetectCandidate(id=id_, hamming=h, cosine=cos)


def shard(
    candidates: list[index_pb2.DetectCandidate] = (),  # type: ignore[assignment]
    nearest: list[index_pb2.DetectCandidate] = (),  # type: ignore[assignment]
) -> index_pb2.DetectResponse:
    return index_pb2.DetectResponse(
        candidates=candidates, stage1_count=len(candidates), nearest=nearest
    )


def test_unique_stage1_candidate_decides_without_cosine() -> None:
    d = decide([shard([cand("a", 12, 0.1)]), shard()], T)
    assert d.matched is not None and d.matched.id == "a"
    assert d.stage == gateway_pb2.DECISION_STAGE_UNIQUE_FIRST_KEY


def test_unique_candidate_still_needs_cosine_when_required() -> None:
    d = decide([shard([cand("a", 3, 0.5)])], T, require_second_key=True)
    assert d.matched is None and d.stage == gateway_pb2.DECISION_STAGE_SECOND_KEY


def test_candidates_across_shards_pick_highest_cosine() -> None:
    d = decide([shard([cand("a", 2, 0.91)]), shard([cand("b", 9, 0.97)])], T)
    assert d.matched is not None and d.matched.id == "b"
    assert d.stage1_count == 2 and d.stage == gateway_pb2.DECISION_STAGE_SECOND_KEY


def test_best_cosine_below_threshold_is_no_match() -> None:
    d = decide([shard([cand("a", 2, 0.89), cand("b", 3, 0.5)])], T)
    assert d.matched is None and d.stage1_count == 2


def test_the_trimmed_view_answers_only_when_the_image_as_is_matched_nothing() -> None:
    as_is_match = decide([shard([cand("a", 1, 0.95)])], T)
    as_is_none = decide([shard([cand("a", 1, 0.5), cand("b", 2, 0.4)])], T)
    view_match = decide([shard([cand("b", 0, 0.99)])], T)
    view_none = decide([shard()], T)
    assert with_trimmed_view(as_is_match, view_match) == (as_is_match, False)
    assert with_trimmed_view(as_is_none, view_match) == (view_match, True)
    assert with_trimmed_view(as_is_none, view_none) == (as_is_none, False)
    assert with_trimmed_view(as_is_none, None) == (as_is_none, False)


def test_fallback_uses_global_k_nearest() -> None:
    t = common_pb2.Thresholds(max_hamming=12, min_cosine=0.9, fallback_k=2)
    d = decide(
        [shard(nearest=[cand("a", 13, 0.5), cand("c", 20, 0.99)]),
         shard(nearest=[cand("b", 14, 0.95)])],
        t,
    )  # fmt: skip
    # The global 2 nearest are a (13) and b (14); c is outside K despite its cosine.
    assert d.matched is not None and d.matched.id == "b"
    assert d.stage == gateway_pb2.DECISION_STAGE_FALLBACK and d.stage2_count == 2


def test_k_zero_is_strict_paper_behaviour() -> None:
    t = common_pb2.Thresholds(max_hamming=12, min_cosine=0.9, fallback_k=0)
    d = decide([shard(nearest=[cand("a", 13, 0.99)])], t)
    assert d.matched is None and d.stage == gateway_pb2.DECISION_STAGE_NO_CANDIDATE


def test_merge_orders_by_hamming_fine_then_id(rng: np.random.Generator) -> None:
    hits = [
        index_pb2.SimilarHit(
            id=f"i{n}", hamming=int(rng.integers(0, 4)), fine_cosine=float(rng.random())
        )
        for n in range(60)
    ]
    for h in hits[:10]:
        h.fine_cosine = 0.5  # exact ties in both keys fall back to id
    parts = [index_pb2.SimilarResponse(hits=hits[i::3]) for i in range(3)]
    got = [h.id for h in merge_similar(parts, 25)]
    want = [h.id for h in sorted(hits, key=lambda h: (h.hamming, -h.fine_cosine, h.id))]
    assert got == want[:25]


def test_the_query_background_raises_the_cosine_bar() -> None:
    """Stage 2 passes when cosine - background_weight * background >= min_cosine."""
    t = common_pb2.Thresholds(
        max_hamming=12, min_cosine=0.5, fallback_k=4, background_weight=0.5
    )
    answer = [shard([cand("a", 2, 0.9), cand("b", 3, 0.5)])]
    assert decide(answer, t, background=0.79).matched is not None  # 0.9 >= 0.895
    assert decide(answer, t, background=0.81).matched is None  # 0.9 < 0.905
    fallback = [shard(nearest=[cand("a", 20, 0.9)])]
    assert decide(fallback, t, background=0.79).matched is not None
    assert decide(fallback, t, background=0.81).matched is None
    # weight 0 is the seed rule, whatever the background
    plain = common_pb2.Thresholds(max_hamming=12, min_cosine=0.9, fallback_k=4)
    assert decide(answer, plain, background=1.0).matched is not None
    # a unique stage-1 candidate needs no cosine unless required
    one = [shard([cand("a", 2, 0.1)])]
    assert decide(one, t, background=1.0).matched is not None
    assert decide(one, t, background=1.0, require_second_key=True).matched is None
