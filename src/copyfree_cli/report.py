"""Human-readable rendering of gateway answers (verdict first, then the evidence)."""

from __future__ import annotations

from copyfree.v1 import common_pb2, gateway_pb2

_STAGE_TEXT = {
    gateway_pb2.DECISION_STAGE_UNIQUE_FIRST_KEY: "unique first-key match (stage 1)",
    gateway_pb2.DECISION_STAGE_SECOND_KEY: "second-key cosine over stage-1 candidates",
    gateway_pb2.DECISION_STAGE_FALLBACK: "second-key cosine over nearest first keys",
    gateway_pb2.DECISION_STAGE_NO_CANDIDATE: "no candidate to compare with",
}


def _meta(m: gateway_pb2.RegisteredMatch | gateway_pb2.Recommendation) -> str:
    md = m.metadata
    parts = [p for p in (md.title, md.owner, md.licence) if p]
    return " | ".join(parts)


def _cosine_bar(t: common_pb2.Thresholds, background: float) -> str:
    """The cosine stage 2 asked for: min_cosine, raised by the query's background
    similarity when the bundle weighs it (copyfree.background)."""
    if not t.background_weight:
        return f"{t.min_cosine:g}"
    bar = t.min_cosine + t.background_weight * background
    return (
        f"{bar:.4f} = {t.min_cosine:g} + {t.background_weight:g} x background "
        f"{background:.3f}"
    )


def render_check(reply: gateway_pb2.CheckResponse, label: str = "") -> str:
    ev = reply.evidence
    t = ev.thresholds
    lines = []
    head = f"[{label}] " if label else ""
    if reply.verdict == gateway_pb2.VERDICT_REGISTERED:
        m = reply.match
        lines.append(f"{head}REGISTERED: {m.collection}/{m.id}  {_meta(m)}")
        lines.append(
            f"  match: hamming {m.hamming} (<= {t.max_hamming} is stage 1), "
            f"cosine {m.cosine:.4f} (threshold {_cosine_bar(t, ev.background)})"
        )
    else:
        lines.append(
            f"{head}UNVERIFIED: not confirmed as a registered work; "
            "treat it as a risk and use a recommended image instead"
        )
    lines.append(
        f"  decided by: {_STAGE_TEXT.get(ev.stage, 'unknown')}; "
        f"{ev.stage1_candidates} within hamming <= {t.max_hamming}, "
        f"{ev.stage2_candidates} compared by cosine (K={t.fallback_k}); "
        f"{ev.searched} registered works searched on {ev.shards} shard(s)"
    )
    if ev.trimmed:
        lines.append(
            "  matched with the image's uniform border (frame, slide margin, shifted "
            "copy's fill) undone; as it is, it matched nothing"
        )
    if ev.top_candidates:
        best = ", ".join(
            f"{c.id} (h={c.hamming}, cos={c.cosine:.3f})" for c in ev.top_candidates[:3]
        )
        lines.append(f"  closest registered: {best}")
    lines.append(f"  detection model: {ev.model.version}")
    if reply.recommendations:
        lines.append(
            "  recommended copyright-free images "
            f"(model {reply.retrieval_model.version}):"
        )
        lines.extend(render_recommendations(reply.recommendations, indent="    "))
    return "\n".join(lines)


def render_recommendations(
    recs: list[gateway_pb2.Recommendation] | object, indent: str = "  "
) -> list[str]:
    out = []
    for r in recs:  # type: ignore[attr-defined]
        out.append(
            f"{indent}{r.rank:>2}. {r.id}  hamming {r.hamming}, "
            f"fine {r.fine_cosine:.3f}"
            f"  {_meta(r)}"
        )
    return out
