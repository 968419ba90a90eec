"""OpenRLHF's ``POST /get_reward`` over real HTTP against `grace serve reward` (tiny models, small limits).

The request is built as OpenRLHF's ``remote_rm_fn`` builds it (``{"query", "prompts", "labels"}``, query =
prompt + response), and the answer is read as OpenRLHF reads it (``torch.tensor`` of each list).
"""

from __future__ import annotations

import re

import httpx
import pytest
import torch

from shared.schemas import METRIC_SYMBOLS
from tests.reward.test_scorer import DOC_OTHER, DOC_SHORT, structured

TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def api(reward_service):
    with httpx.Client(base_url=reward_service.url, headers=reward_service.headers, timeout=120) as client:
        yield client


def message(reply) -> str:
    return reply.json()["error"]["message"]


def test_get_reward_groups_by_prompt_and_matches_v1_score(api):
    report, brief = TEMPLATE.format("Report on SOE reform"), TEMPLATE.format("国企改革简报")
    a = [structured("s1", DOC_SHORT), structured("s2", DOC_OTHER), "no tags at all", structured("s3", DOC_SHORT * 3)]
    b = [structured("摘要", DOC_OTHER), structured("摘要二", DOC_OTHER * 2)]
    # interleaved, as a batch of several prompts' samples may come
    samples = [(report, a[0]), (brief, b[0]), (report, a[1]), (report, a[2]), (brief, b[1]), (report, a[3])]
    body = {"query": [p + r for p, r in samples], "prompts": [p for p, _ in samples], "labels": [""] * len(samples)}
    reply = api.post("/get_reward", json=body)
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    assert set(answer) == {"rewards", "scores", "extra_logs"}
    rewards, scores = torch.tensor(answer["rewards"]), torch.tensor(answer["scores"])  # as OpenRLHF reads them
    assert rewards.shape == scores.shape == (6,)
    logs = answer["extra_logs"]
    assert set(logs) == {*METRIC_SYMBOLS, "parsed", "rank_sum", "zero_variance_group"}
    assert all(torch.tensor(v).shape == (6,) for v in logs.values())

    # the same groups through /v1/score, as one request: the same scorer, the same calibration
    score = api.post("/v1/score", json={"groups": [{"query": report, "responses": a}, {"query": brief, "responses": b}]})
    ga, gb = (g["results"] for g in score.json()["groups"])
    za = [r["z"] for r in ga]
    floor = min(z for z in za if z is not None) - 1.0
    expected_rewards = [za[0], gb[0]["z"], za[1], floor, gb[1]["z"], za[3]]
    assert answer["rewards"] == pytest.approx(expected_rewards)
    assert answer["scores"] == pytest.approx([r["weight"] for r in (ga[0], gb[0], ga[1], ga[2], gb[1], ga[3])])
    assert answer["scores"][3] == -1.0 and logs["parsed"] == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    assert logs["L"][0] == ga[0]["metrics"]["length"] and logs["Rd"][1] == gb[0]["metrics"]["relevance_document"]
    assert logs["L"][3] == 0.0  # unparsed: 0, and parsed says so
    # sign convention of /v1/score: higher is better, mean 0 over each group's parsed samples
    assert sum(answer["rewards"][i] for i in (0, 2, 5)) == pytest.approx(0.0, abs=1e-9)
    assert answer["rewards"][1] + answer["rewards"][4] == pytest.approx(0.0, abs=1e-9)


def test_prefix_mismatch_and_length_mismatch_are_422_naming_the_field(api):
    reply = api.post("/get_reward", json={"query": ["P1 answer", "other P2 answer"], "prompts": ["P1", "P2"]})
    assert reply.status_code == 422, reply.text
    assert re.search(r"(^|; )query\.1: does not start with prompts\.1", message(reply)), message(reply)
    assert "query.0" not in message(reply)
    reply = api.post("/get_reward", json={"query": ["P1 a", "P1 b"], "prompts": ["P1"]})
    assert reply.status_code == 422 and "prompts has 1 entries for 2 queries" in message(reply)


@pytest.mark.parametrize(
    "samples, field, words",
    [
        ([(f"P{g}", "x") for g in range(4)], "prompts", "at most 3 distinct prompts"),  # max_groups 3
        ([("P", "x")] * 5, "prompts.0", "5 samples share this prompt; at most 4"),  # max_responses 4
        ([("P", "x"), ("P", "y" * 6001)], "query.1", "response longer than 6000"),  # max_response_chars
        ([("P" * 501, "x")], "prompts.0", "longer than 500"),  # max_query_chars
        ([("", "x")], "prompts.0", "at least 1 character"),
    ],
)
def test_limits_of_v1_score_hold_per_group(api, samples, field, words):
    body = {"query": [p + r for p, r in samples], "prompts": [p for p, _ in samples]}
    reply = api.post("/get_reward", json=body)
    assert reply.status_code == 422, reply.text
    assert re.search(rf"(^|; ){re.escape(field)}: [^;]*{re.escape(words)}", message(reply)), message(reply)


def test_get_reward_needs_the_key_and_is_documented(reward_service, api):
    body = {"query": ["P x"], "prompts": ["P"]}
    with httpx.Client(base_url=reward_service.url, timeout=30) as client:
        assert client.post("/get_reward", json=body).status_code == 401
    operation = api.get("/openapi.json").json()["paths"]["/get_reward"]["post"]
    assert {"401", "413", "422", "503"} <= set(operation["responses"])


def test_metrics_report_the_group_health_of_the_last_request(api):
    tied = structured("s", DOC_SHORT)
    body = {"query": ["P" + tied, "P" + tied, "Q" + tied, "Qplain"], "prompts": ["P", "P", "Q", "Q"]}
    assert api.post("/get_reward", json=body).status_code == 200
    text = api.get("/metrics").text

    def gauge(name: str, labels: str) -> float:
        match = re.search(rf"^{name}\{{{re.escape(labels)}\}} (\S+)$", text, re.MULTILINE)
        assert match, f"{name}{{{labels}}} not in /metrics"
        return float(match.group(1))

    assert gauge("grace_reward_zero_variance_share", 'source="request"') == 1.0  # P: tied; Q: one parsed
    assert gauge("grace_reward_parse_rate", 'source="request"') == 0.75
    assert gauge("grace_reward_health_groups", 'source="request"') == 2
    assert gauge("grace_reward_metric_std", 'metric="L",source="request"') == 0.0  # the same document thrice
    assert gauge("grace_reward_metric_mean", 'metric="L",source="request"') > 0
    assert 'grace_reward_requests_total{route="/get_reward",status="200"}' in text
