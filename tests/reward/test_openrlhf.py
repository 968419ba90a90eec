"""OpenRLHF's flat lists <-> GRACE groups (services.reward.openrlhf), pure: no models."""

from __future__ import annotations

import pytest

from services.reward.openrlhf import UNPARSED_MARGIN, group_by_prompt, prefix_mismatches, remote_reward, unparsed_reward
from services.reward.scorer import score_response
from shared.schemas import METRIC_SYMBOLS, Metrics


def test_samples_sharing_a_prompt_form_a_group_in_order_of_first_appearance():
    prompts = ["<p>B", "<p>A", "<p>B", "<p>A", "<p>B"]
    queries = [p + r for p, r in zip(prompts, ["b0", "a0", "b1", "a1", ""])]
    groups = group_by_prompt(queries, prompts)
    assert groups.prompts == ["<p>B", "<p>A"]
    assert groups.responses == [["b0", "b1", ""], ["a0", "a1"]]
    assert groups.members == [[0, 2, 4], [1, 3]] and groups.samples == 5


def test_a_query_that_does_not_start_with_its_prompt_is_named():
    assert prefix_mismatches(["P1 r", "xP2 r", "P3"], ["P1", "P2", "P3"]) == [1]
    with pytest.raises(ValueError, match="query 1 does not start with its prompt"):
        group_by_prompt(["P1 r", "xP2 r"], ["P1", "P2"])


def test_unparsed_reward_sits_below_every_parsed_z():
    assert unparsed_reward([1.2, 0.0, -1.2]) == pytest.approx(-1.2 - UNPARSED_MARGIN)
    assert unparsed_reward([0.0]) == -UNPARSED_MARGIN
    assert unparsed_reward([]) == -UNPARSED_MARGIN


def metric(length: float) -> Metrics:
    return Metrics(length=length, diversity=50, professionalism=1, general_perplexity=3, domain_perplexity=2,
                   relevance_summary=0.5, relevance_document=0.4)  # fmt: skip


def test_the_flat_answer_maps_each_sample_back_to_its_group_result():
    # group A: three parsed (lengths 10 < 20 < 30, all else tied) and one unparsed; group B: one parsed
    prompts = ["A", "B", "A", "A", "A"]
    groups = group_by_prompt([p + "x" for p in prompts], prompts)
    scored = score_response([("A", [metric(10), metric(20), None, metric(30)]), ("B", [metric(5)])])
    answer = remote_reward(groups, scored)
    a, b = scored.groups
    z = [r.z for r in a.results]
    assert z[3] > z[1] > z[0] and z[1] == 0.0  # the longest document ranks best (eq. 5-6)
    assert answer.rewards == [z[0], b.results[0].z, z[1], -UNPARSED_MARGIN + min(z[0], z[1], z[3]), z[3]]
    assert answer.scores == [a.results[0].weight, b.results[0].weight, a.results[1].weight, -1.0, a.results[3].weight]
    logs = answer.extra_logs
    assert set(logs) == {*METRIC_SYMBOLS, "parsed", "rank_sum", "zero_variance_group"}
    assert all(len(values) == 5 for values in logs.values())
    assert logs["L"] == [10.0, 5.0, 20.0, 0.0, 30.0]
    assert logs["parsed"] == [1.0, 1.0, 1.0, 0.0, 1.0]
    assert logs["zero_variance_group"] == [0.0, 1.0, 0.0, 0.0, 0.0]  # B has a single response
    assert logs["rank_sum"][3] == 0.0 and logs["rank_sum"][0] == a.results[0].rank_sum
