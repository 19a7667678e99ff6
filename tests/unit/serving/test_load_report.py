"""The load generator's report: the numbers ghz reports, in ghz's JSON shape."""

from __future__ import annotations

from collections import Counter

import pytest

from copyfree_cli.load import Report, RunSpec, Target, gateway_overhead, run


def test_report_counts_rates_percentiles_and_distributions() -> None:
    r = Report("check c=2", 2, count=4, total_s=2.0)
    r.latencies_s = [0.010, 0.020, 0.030, 0.040]
    r.status_codes = Counter({"OK": 3, "UNAVAILABLE": 1})
    r.errors = Counter({"UNAVAILABLE: shard down": 1})
    assert r.rps == 2.0
    assert r.percentile_s(50) == pytest.approx(0.025)
    assert r.error_count == 1
    doc = r.ghz_json()
    assert doc["count"] == 4 and doc["total"] == 2_000_000_000
    assert doc["fastest"] == 10_000_000 and doc["slowest"] == 40_000_000
    assert doc["average"] == 25_000_000 and doc["rps"] == 2.0
    p50 = next(d for d in doc["latencyDistribution"] if d["percentage"] == 50)
    assert p50["latency"] == 25_000_000
    assert doc["statusCodeDistribution"] == {"OK": 3, "UNAVAILABLE": 1}
    text = r.summary()
    for label in ("Count:", "Requests/sec:", "50 % in 25.00 ms", "[UNAVAILABLE]"):
        assert label in text


async def test_run_rejects_unknown_calls_and_empty_runs() -> None:
    with pytest.raises(ValueError, match="call"):
        await run(Target(), RunSpec("nope"), [b"x"])
    with pytest.raises(ValueError, match="duration"):
        await run(Target(), RunSpec("check", duration_s=0, total=0), [b"x"])


def test_gateway_overhead_pairs_each_check_with_the_next_direct_check() -> None:
    def rep(call: str, c: int, ms: float) -> Report:
        r = Report(f"{call} c={c}", c, count=1, total_s=1.0)
        r.latencies_s = [ms / 1000]
        return r

    reports = [
        rep("check", 1, 11), rep("direct-check", 1, 10),
        rep("check", 1, 12), rep("direct-check", 1, 10),
        rep("check", 8, 50), rep("direct-check", 8, 40),
    ]  # fmt: skip
    overhead = gateway_overhead(reports)
    assert overhead[1] == pytest.approx([0.1, 0.2])
    assert overhead[8] == pytest.approx([0.25])
