"""services/orchestrator/stats.py against values computed by hand."""

from __future__ import annotations

import math

import pytest

from services.orchestrator import stats


def test_t_quantiles():
    assert stats.t975(1) == 12.706 and stats.t975(2) == 4.303 and stats.t975(30) == 2.042
    assert stats.t975(120) == pytest.approx(1.980, abs=2e-3)  # table value 1.980
    assert stats.t975(10_000) == pytest.approx(1.960, abs=1e-3)


def test_mean_ci_by_hand():
    # x = 1, 2, 3: mean 2, sd 1, half-width t(0.975, 2) * 1 / sqrt(3) = 4.303 / 1.7320508 = 2.48434
    mean, lo, hi = stats.mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert lo == pytest.approx(2 - 2.484338, abs=1e-5) and hi == pytest.approx(2 + 2.484338, abs=1e-5)
    # x = 10, 14: mean 12, sd sqrt(8) = 2.828427, half 12.706 * 2.828427 / sqrt(2) = 25.412
    mean, lo, hi = stats.mean_ci([10.0, None, 14.0])  # None is skipped
    assert mean == 12.0 and hi - mean == pytest.approx(25.412, abs=1e-3)
    assert stats.mean_ci([5.0]) == (5.0, 5.0, 5.0)  # one seed: zero width
    assert stats.mean_ci([None, float("nan")]) == (None, None, None)


def test_method_table_ranks_average_rank_and_gain():
    def seed(length, e, p, rs, rd):
        return {"length": length, "diversity": e, "professionalism": p, "relevance_summary": rs, "relevance_document": rd}

    per_seed = {
        "sft": [seed(10, 1.0, 0.5, 0.2, 0.3), seed(12, 1.0, 0.5, 0.2, 0.3)],  # L mean 11
        "kto": [seed(20, 2.0, 0.5, 0.1, None), seed(22, 2.0, 0.5, 0.1, None)],  # L 21, Rd missing
        "grace": [seed(30, 0.5, 0.5, 0.3, 0.4), seed(34, 0.5, 0.5, 0.3, 0.4)],  # L 32
    }
    t = stats.method_table(per_seed)
    # L: grace 1, kto 2, sft 3 ; E: kto 1, sft 2, grace 3 ; P: all tied -> 2 ; Rs: grace 1, sft 2, kto 3 ;
    # Rd: grace 1, sft 2, kto (missing) 3
    assert [t[m]["metrics"]["L"]["rank"] for m in ("sft", "kto", "grace")] == [3, 2, 1]
    assert [t[m]["metrics"]["P"]["rank"] for m in ("sft", "kto", "grace")] == [2, 2, 2]
    assert t["kto"]["metrics"]["Rd"]["rank"] == 3 and t["kto"]["metrics"]["Rd"]["mean"] is None
    assert t["sft"]["avg_rank"] == pytest.approx((3 + 2 + 2 + 2 + 2) / 5)
    assert t["kto"]["avg_rank"] == pytest.approx((2 + 1 + 2 + 3 + 3) / 5)
    assert t["grace"]["avg_rank"] == pytest.approx((1 + 3 + 2 + 1 + 1) / 5)
    assert t["grace"]["metrics"]["L"]["gain_pct"] == pytest.approx((32 - 11) / 11 * 100)
    assert t["kto"]["metrics"]["Rs"]["gain_pct"] == pytest.approx(-50.0)
    assert t["sft"]["metrics"]["L"]["gain_pct"] is None
    # L of grace: 30, 34 -> mean 32, sd 2.828427, half 12.706 * 2 = 25.412
    assert t["grace"]["metrics"]["L"]["ci95"] == pytest.approx([32 - 25.412, 32 + 25.412], abs=1e-3)


def test_seed_ranks_rank_each_seed_on_its_own():
    def seed(length, e):
        return {"length": length, "diversity": e, "professionalism": 0.0, "relevance_summary": 0.0, "relevance_document": 0.0}

    per_seed = {"sft": [seed(10, 1.0), seed(10, 1.0)], "grace": [seed(30, 0.5), seed(5, 0.5)]}
    # seed 0: L grace 1 / sft 2, E sft 1 / grace 2, P, Rs, Rd tied 1.5 -> both (1 + 2 + 4.5) / 5 = 1.5
    # seed 1: L sft 1 / grace 2, E sft 1 / grace 2 -> sft (1 + 1 + 4.5) / 5 = 1.3, grace (2 + 2 + 4.5) / 5 = 1.7
    ranks = stats.seed_ranks(per_seed)
    assert ranks == [pytest.approx({"sft": 1.5, "grace": 1.5}), pytest.approx({"sft": 1.3, "grace": 1.7})]
    # the seed means (L 17.5 vs 10, E 0.5 vs 1) tie the two at 1.5: the per-seed view shows seed 1 went to sft
    table = stats.method_table(per_seed)
    assert table["grace"]["avg_rank"] == pytest.approx(1.5) and table["sft"]["avg_rank"] == pytest.approx(1.5)
    assert stats.seed_ranks({}) == []


def test_sign_flip_exact_by_hand():
    # d = 1, 2, 3: of the 8 sign patterns only +++ and --- reach |sum| = 6: p = 2/8
    assert stats.sign_flip_p([1.0, 2.0, 3.0]) == 0.25
    # d = 1, -1: sums 0, 2, -2, 0; |sum| >= 0 for all four: p = 1
    assert stats.sign_flip_p([1.0, -1.0]) == 1.0
    # d = 3, 1: sums 4, 2, -2, -4 -> |sum| >= 4 in 2 of 4
    assert stats.sign_flip_p([3.0, 1.0]) == 0.5
    assert stats.sign_flip_p([]) == 1.0
    assert stats.sign_flip_p([0.0, 0.0]) == 1.0
    # 5 positive units: only the two all-equal-sign patterns are as extreme: 2/32
    assert stats.sign_flip_p([0.1, 0.2, 0.3, 0.4, 0.5]) == pytest.approx(2 / 32)


def test_sign_flip_monte_carlo_for_many_units():
    p = stats.sign_flip_p([1.0] * 40, resamples=2000)  # exact: 2 / 2^40; MC: the (0 + 1) / (2000 + 1) floor
    assert p == pytest.approx(1 / 2001)
    assert stats.sign_flip_p([1.0, -1.0] * 10, resamples=2000) == pytest.approx(1.0)


def test_unit_means_average_the_parsed_samples_of_a_query():
    def rec(q, parsed, length):
        metrics = None if not parsed else {k: length for k in stats.METRICS.values()}
        return {"query_id": q, "parsed": parsed, "metrics": metrics}

    units = stats.unit_means([rec("a", True, 10), rec("a", True, 20), rec("a", False, 99), rec("b", False, 0)], seed=1)
    assert units[(1, "a")]["L"] == 15.0 and units[(1, "a")]["Rd"] == 15.0
    assert units[(1, "b")] == {s: None for s in stats.METRICS}


def test_paired_comparison_by_hand():
    def u(length, others=0.0):
        return {"L": length, "E": others, "P": others, "Rs": others, "Rd": others}

    units = {
        "sft": {(0, "a"): u(5), (0, "b"): u(5), (1, "a"): u(5)},
        "kto": {(0, "a"): u(10), (0, "b"): u(12), (1, "a"): u(8)},
        "grace": {(0, "a"): u(11), (0, "b"): u(15), (1, "a"): u(10, others=1.0)},
    }
    c = stats.paired_comparison(units, "grace", "kto")
    # L: diffs 1, 3, 2 -> mean 2, exact p = 2/8
    assert c["metrics"]["L"]["mean_diff"] == pytest.approx(2.0) and c["metrics"]["L"]["p_value"] == 0.25
    assert c["metrics"]["E"]["mean_diff"] == pytest.approx(1 / 3) and c["metrics"]["E"]["units"] == 3
    # per unit average ranks among sft, kto, grace:
    #  (0,a), (0,b): L ranks grace 1, kto 2, sft 3; E..Rd all tied at 2 -> grace 1.8, kto 2.0: diff -0.2
    #  (1,a): L grace 1, kto 2; E..Rd grace 1, kto and sft tied 2.5 -> grace 1.0, kto (2 + 4 * 2.5) / 5 = 2.4: diff -1.4
    assert c["avg_rank"]["mean_diff"] == pytest.approx((-0.2 - 0.2 - 1.4) / 3)
    assert c["avg_rank"]["p_value"] == 0.25 and c["avg_rank"]["units"] == 3
    # sft: L rank 3 with the others tied at 2 -> 2.2 twice; then L 3 and four 2.5 -> 2.6
    assert math.isclose(sum(stats.unit_average_ranks(units)["sft"].values()), 2.2 + 2.2 + 2.6)
