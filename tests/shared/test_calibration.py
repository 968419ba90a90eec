"""Eq. 5-9 by hand, and their invariants as hypothesis properties."""

import math
import random
from dataclasses import dataclass, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.calibration import (
    average_ranks,
    calibrate,
    degenerate_group_count,
    global_normalize,
    group_z,
    rank_sum,
)


@dataclass(frozen=True)
class Mx:
    length: float
    diversity: float
    professionalism: float
    domain_perplexity: float
    relevance_summary: float
    relevance_document: float
    general_perplexity: float = 0.0


A = Mx(length=100, diversity=50, professionalism=0.3, domain_perplexity=10, relevance_summary=2.0, relevance_document=1.0)
B = Mx(length=200, diversity=50, professionalism=0.1, domain_perplexity=12, relevance_summary=1.5, relevance_document=0.9)
C = Mx(length=150, diversity=40, professionalism=0.2, domain_perplexity=8, relevance_summary=1.8, relevance_document=1.1)
D = Mx(length=10, diversity=10, professionalism=0.0, domain_perplexity=20, relevance_summary=0.1, relevance_document=0.1)
E = Mx(length=20, diversity=20, professionalism=1.0, domain_perplexity=5, relevance_summary=0.2, relevance_document=0.2)


def test_average_ranks_best_is_one_and_ties_share():
    assert average_ranks([10, 30, 20]) == [3, 1, 2]
    assert average_ranks([10, 30, 20], higher_is_better=False) == [1, 3, 2]
    assert average_ranks([5, 5, 1, 5]) == [2, 2, 4, 2]


def test_rank_sum_hand_example_with_a_tie():
    # L: B1 C2 A3 | E: A,B tie 1.5 C3 | P: A1 C2 B3 | Rd: C1 A2 B3 | Rs: A1 C2 B3 | PD (lower better): C1 A2 B3
    # A = 3 + 1.5 + 1 + 0.8*2 + 0.2*1 + 2 ; B = 1 + 1.5 + 3 + 0.8*3 + 0.2*3 + 3 ; C = 2 + 3 + 2 + 0.8*1 + 0.2*2 + 1
    assert rank_sum([A, B, C]) == pytest.approx([9.3, 11.5, 9.2])


def test_group_z_hand_example():
    # -rho = (-9.3, -11.5, -9.2), mean -10, deviations (0.7, -1.5, 0.8), population var 3.38 / 3
    std = math.sqrt(3.38 / 3)
    assert group_z([9.3, 11.5, 9.2]) == pytest.approx([0.7 / std, -1.5 / std, 0.8 / std])


def test_group_z_degenerate_and_float_noise():
    assert group_z([4.0, 4.0, 4.0]) == [0.0, 0.0, 0.0]
    assert group_z([7.5]) == [0.0]
    assert group_z([0.1 + 0.2, 0.3, 0.3]) == [0.0, 0.0, 0.0]  # float noise is not a difference
    assert group_z([1.0, 2.0, 3.0]) == pytest.approx([math.sqrt(1.5), 0.0, -math.sqrt(1.5)])
    assert group_z([1.0, 2.0, 3.0])[1] == 0.0  # exactly 0, so in Omega+


def test_global_normalize_hand_example_with_mixed_signs():
    zs = [0.5, -1.0, 1.5, 0.0, -3.0]
    # Omega+ = {0.5, 1.5, 0.0}: sum 2, |Omega+| = 3 ; Omega- = {-1, -3}: sum -4, |Omega-| = 2
    assert global_normalize(zs) == pytest.approx([0.75, -0.5, 2.25, 0.0, -1.5])
    assert global_normalize([0.0, 0.0]) == [0.0, 0.0]  # a zero sum gives weight 0
    assert global_normalize([]) == []


def test_calibrate_dataset_hand_example():
    unparsed = None
    out = calibrate([[A, B, unparsed, C], [D, E], [unparsed, unparsed]])
    std = math.sqrt(3.38 / 3)
    z = [0.7 / std, -1.5 / std, 0.8 / std]
    # group 2: E beats D on L, E, P, Rd, Rs and PD -> rank sums 5 and 10 -> Z = +1 / -1
    pos_sum = z[0] + z[2] + 1.0
    neg_sum = z[1] - 1.0
    g1, g2, g3 = out
    assert [r.rank_sum for r in g1] == pytest.approx([9.3, 11.5, None, 9.2])
    assert [r.z for r in g1] == pytest.approx([z[0], z[1], None, z[2]])
    assert [r.weight for r in g1] == pytest.approx([z[0] / pos_sum * 3, -z[1] / neg_sum * 2, -1.0, z[2] / pos_sum * 3])
    assert [(r.rank_sum, r.z) for r in g2] == [(10.0, -1.0), (5.0, 1.0)]
    assert [r.weight for r in g2] == pytest.approx([1.0 / neg_sum * 2, 1.0 / pos_sum * 3])
    assert [(r.parsed, r.rank_sum, r.z, r.weight) for r in g3] == [(False, None, None, -1.0)] * 2
    weights = [r.weight for g in out for r in g if r.parsed]
    assert sum(w for w in weights if w >= 0) == pytest.approx(3.0)  # |Omega+|
    assert sum(w for w in weights if w < 0) == pytest.approx(-2.0)  # -|Omega-|
    assert [r.desirable for r in g1] == [True, False, False, True]


def test_degenerate_group_gets_zero_weight_and_one_response_group_too():
    out = calibrate([[A, A, A], [B]])
    assert [r.z for g in out for r in g] == [0.0] * 4
    assert [r.weight for g in out for r in g] == [0.0] * 4
    assert all(r.desirable for g in out for r in g)


def test_default_keeps_eq8_literally_a_singleton_group_joins_omega_plus():
    std = math.sqrt(3.38 / 3)
    z = [0.7 / std, -1.5 / std, 0.8 / std]
    pos_sum, neg_sum = z[0] + z[2] + 1.0, z[1] - 1.0  # groups [A, B, C] and [D, E] (see the hand example)
    out = calibrate([[A, B, C], [D, E], [None, A]])
    assert calibrate([[A, B, C], [D, E], [None, A]], degenerate_groups="omega_plus") == out  # the default
    (g1, g2, g3) = out
    # the singleton's Z = 0 member is in Omega+: |Omega+| = 4, not 3, and the Z > 0 weights grow by 4/3
    assert [(r.rank_sum, r.z, r.weight, r.desirable) for r in g3] == [(None, None, -1.0, False), (5.0, 0.0, 0.0, True)]
    assert [r.weight for r in g1] == pytest.approx([z[0] / pos_sum * 4, -z[1] / neg_sum * 2, z[2] / pos_sum * 4])
    assert [r.weight for r in g2] == pytest.approx([1.0 / neg_sum * 2, 1.0 / pos_sum * 4])
    assert sum(r.weight for g in out for r in g if r.parsed and r.weight >= 0) == pytest.approx(4.0)


def test_exclude_gives_degenerate_groups_zero_weight_and_leaves_the_rest_as_without_them():
    base = calibrate([[A, B, C], [D, E]])
    out = calibrate([[A, B, C], [B], [D, E], [C, C, None, C]], degenerate_groups="exclude")
    assert out[0] == base[0] and out[2] == base[1]
    assert [(r.rank_sum, r.z, r.weight) for r in out[1]] == [(5.0, 0.0, 0.0)]  # rank 1 on every term: 1+1+1+0.8+0.2+1
    assert [(r.parsed, r.z, r.weight) for r in out[3]] == [(True, 0.0, 0.0)] * 2 + [(False, None, -1.0), (True, 0.0, 0.0)]
    assert out[3][0].rank_sum == 2 * 5.0  # all tied: rank 2 on every term
    assert all(r.desirable for r in out[1] + out[3] if r.parsed)  # still Omega+ by sign, just weight 0
    with pytest.raises(ValueError, match="degenerate_groups"):
        calibrate([[A]], degenerate_groups="drop")  # type: ignore[arg-type]


def test_degenerate_group_count():
    assert degenerate_group_count([]) == 0
    assert degenerate_group_count([[A, B, C], [D, E]]) == 0
    # singleton, all tied, one parsed of two, nothing parsed
    assert degenerate_group_count([[A, B, C], [B], [C, C, None, C], [None, D], [None, None], [D, E]]) == 4


# --------------------------------------------------------------------------- properties

metric_value = st.integers(0, 3).map(float)  # small domain: many ties
metrics = st.builds(
    Mx, length=metric_value, diversity=metric_value, professionalism=metric_value,
    domain_perplexity=metric_value, relevance_summary=metric_value, relevance_document=metric_value,
)  # fmt: skip
maybe_metrics = st.one_of(st.none(), metrics, metrics, metrics)
datasets = st.lists(st.lists(maybe_metrics, min_size=1, max_size=8), min_size=1, max_size=6)


@given(datasets)
def test_weights_preserve_mass_and_unparsed_is_minus_one(groups):
    out = calibrate(groups)
    zs = [r.z for g in out for r in g if r.parsed]
    weights = [r.weight for g in out for r in g if r.parsed]
    pos = [w for w, z in zip(weights, zs) if z >= 0]
    neg = [w for w, z in zip(weights, zs) if z < 0]
    if any(z > 0 for z in zs):
        assert math.fsum(pos) == pytest.approx(len(pos))  # eq. 8
    else:
        assert all(w == 0 for w in pos)
    assert math.fsum(neg) == pytest.approx(-len(neg)) if neg else True  # eq. 9
    assert all(w > 0 for w, z in zip(weights, zs) if z > 0) and all(w < 0 for w in neg)
    for g_in, g_out in zip(groups, out):
        for m, r in zip(g_in, g_out):
            assert r.parsed == (m is not None)
            if m is None:
                assert (r.weight, r.z, r.rank_sum) == (-1.0, None, None)


@given(st.lists(metrics, min_size=1, max_size=8))
def test_group_z_is_standardized_and_rank_sums_are_complete(group):
    m = len(group)
    sums = rank_sum(group)
    assert math.fsum(sums) == pytest.approx(5 * m * (m + 1) / 2)  # weights 1+1+1+0.8+0.2+1 = 5
    zs = group_z(sums)
    assert math.fsum(zs) == pytest.approx(0.0, abs=1e-9)
    if len(set(sums)) > 1:
        assert math.fsum(z * z for z in zs) / m == pytest.approx(1.0)  # population std 1
    else:
        assert zs == [0.0] * m


@given(st.lists(metrics, min_size=2, max_size=8), st.randoms(use_true_random=False))
def test_permuting_a_group_permutes_its_results(group, rnd):
    order = list(range(len(group)))
    rnd.shuffle(order)
    base = calibrate([group])[0]
    shuffled = calibrate([[group[i] for i in order]])[0]
    assert shuffled == [base[i] for i in order]


@given(st.lists(metrics, min_size=1, max_size=8))
def test_strictly_increasing_transforms_change_nothing(group):
    moved = [
        replace(
            m,
            length=m.length * 7 + 3,
            domain_perplexity=math.exp(m.domain_perplexity),
            relevance_summary=-1 / (m.relevance_summary + 1),
        )
        for m in group
    ]
    assert calibrate([group]) == calibrate([moved])


@given(st.lists(metrics, min_size=2, max_size=8))
def test_a_dominating_response_never_weighs_less(group):
    best = Mx(length=9, diversity=9, professionalism=9, domain_perplexity=-1, relevance_summary=9, relevance_document=9)
    worst = Mx(length=-1, diversity=-1, professionalism=-1, domain_perplexity=9, relevance_summary=-1, relevance_document=-1)
    out = calibrate([group + [best, worst]])[0]
    weights = [r.weight for r in out]
    assert out[-2].rank_sum == min(r.rank_sum for r in out) and weights[-2] == max(weights)
    assert out[-1].rank_sum == max(r.rank_sum for r in out) and weights[-1] == min(weights)


@settings(max_examples=50)
@given(datasets, st.integers(0, 5))
def test_unparsed_responses_do_not_move_other_weights(groups, extra):
    rnd = random.Random(extra)
    padded = []
    for g in groups:
        g = list(g)
        for _ in range(extra):
            g.insert(rnd.randrange(len(g) + 1), None)
        padded.append(g)
    before = [r for g in calibrate(groups) for r in g if r.parsed]
    after = [r for g in calibrate(padded) for r in g if r.parsed]
    assert before == after


@given(datasets)
def test_exclude_equals_calibrating_without_the_degenerate_groups(groups):
    def degenerate(g):
        return degenerate_group_count([g]) == 1

    out = calibrate(groups, degenerate_groups="exclude")
    kept = iter(calibrate([g for g in groups if not degenerate(g)]))
    for g, res in zip(groups, out):
        if degenerate(g):
            assert all((r.z, r.weight) == (0.0, 0.0) for r in res if r.parsed)
        else:
            assert res == next(kept)
    assert degenerate_group_count(groups) == sum(map(degenerate, groups))
    literal = calibrate(groups)
    assert [[(r.rank_sum, r.z) for r in g] for g in out] == [[(r.rank_sum, r.z) for r in g] for g in literal]


def test_the_reward_api_passes_the_degenerate_groups_setting_through():
    from dataclasses import asdict

    from fastapi.testclient import TestClient

    from services.reward.app import create_app
    from services.reward.config import RewardSettings

    def item(m):
        return {"parsed": True, "metrics": asdict(m)}

    body = {"groups": [{"responses": [item(A), item(B), item(C)]}, {"responses": [item(D)]}]}
    for mode in ("omega_plus", "exclude"):
        client = TestClient(create_app(RewardSettings(degenerate_groups=mode, worker=False, api_key=None)))
        reply = client.post("/v1/calibrate", json=body)  # no lifespan: no models, as /v1/calibrate needs none
        assert reply.status_code == 200, reply.text
        weights = [r["weight"] for g in reply.json()["groups"] for r in g["results"]]
        expected = [r.weight for g in calibrate([[A, B, C], [D]], degenerate_groups=mode) for r in g]
        assert weights == pytest.approx(expected)
    assert RewardSettings.model_fields["degenerate_groups"].default == "omega_plus"
    assert "eq. 8" in RewardSettings.model_fields["degenerate_groups"].description
