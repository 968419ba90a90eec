"""The judge against the real rollout service (vLLM CPU, tiny policy) with structured output."""

from __future__ import annotations

import json

import httpx
import pytest
from openai import OpenAI

from services.judge.parsing import judgement_json_schema, parse_judgement
from shared.prompts import JUDGE_CRITERIA_KEYS, judge_prompt
from shared.schemas import CRITERIA
from tests.fixtures.judge import (
    TINY_ANALYSIS_CHARS,
    TINY_COMPLETION_PRICE,
    TINY_FREQUENCY_PENALTY,
    TINY_MAX_TOKENS,
    TINY_PROMPT_PRICE,
)

QUERY = "请撰写一份题为《国有资本投资运营公司改革试点经验》的报告，包含以下部分：\n1. 改革背景\n2. 主要做法\n3. 成效与建议"
RESPONSE = (
    "<summary>总结试点经验。</summary><outline>1. 背景 2. 做法 3. 成效</outline>"
    "<answer>一、改革背景……二、主要做法……三、成效与建议……</answer>"
)


def test_vllm_structured_output_gives_strict_json(rollout_service):
    """With response_format json_schema the tiny model's raw answer is valid JSON with every key."""
    client = OpenAI(base_url=rollout_service.openai_base_url, api_key=rollout_service.api_key, max_retries=0)
    schema = judgement_json_schema(TINY_ANALYSIS_CHARS)
    completion = client.chat.completions.create(
        model="policy", messages=[{"role": "user", "content": judge_prompt(QUERY, RESPONSE)}],
        temperature=0.0, max_tokens=TINY_MAX_TOKENS, frequency_penalty=TINY_FREQUENCY_PENALTY,
        response_format={"type": "json_schema", "json_schema": {"name": "judgement", "schema": schema}},
    )  # fmt: skip
    content = completion.choices[0].message.content
    data = json.loads(content)  # strict JSON, no repair needed
    assert set(data) == {"Analysis", *JUDGE_CRITERIA_KEYS}
    assert all(isinstance(data[k], int) and 1 <= data[k] <= 10 for k in JUDGE_CRITERIA_KEYS)
    assert len(data["Analysis"]) <= TINY_ANALYSIS_CHARS
    result = parse_judgement(content)
    assert result.score == pytest.approx(sum(data[k] for k in JUDGE_CRITERIA_KEYS) * 2)


def test_judge_service_on_the_rollout_service(judge_service):
    response = httpx.post(f"{judge_service.url}/v1/judge", json={"instruction": QUERY, "response": RESPONSE}, timeout=300)
    assert response.status_code == 200, response.text
    body = response.json()
    scores = [body["criteria"][c] for c in CRITERIA]
    assert all(isinstance(s, int) and 1 <= s <= 10 for s in scores)
    assert body["score"] == pytest.approx(sum(scores) / 5 * 10)
    assert isinstance(body["analysis"], str)


def test_judge_service_batch_on_the_rollout_service(judge_service):
    items = [{"instruction": QUERY, "response": RESPONSE[: 40 * (k + 1)]} for k in range(3)]
    response = httpx.post(f"{judge_service.url}/v1/judge/batch", json={"items": items}, timeout=600)
    assert response.status_code == 200, response.text
    out = response.json()["items"]
    assert [i["index"] for i in out] == [0, 1, 2]
    assert all(i["error"] is None and 10 <= i["result"]["score"] <= 100 for i in out), out


def test_judge_service_reports_real_usage_and_cost(judge_service):
    response = httpx.post(
        f"{judge_service.url}/v1/judge", json={"instruction": QUERY, "response": RESPONSE, "reference": RESPONSE}, timeout=300
    )
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    assert usage["prompt_tokens"] > 100 and usage["completion_tokens"] > 0  # the reference is in the prompt
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    expected = (usage["prompt_tokens"] * TINY_PROMPT_PRICE + usage["completion_tokens"] * TINY_COMPLETION_PRICE) / 1e6
    assert usage["cost"] == pytest.approx(expected)


def test_judge_service_pairwise_on_the_rollout_service(judge_service):
    """vLLM's structured output holds the pairwise schema too: each order gives A, B or tie."""
    pair = {"instruction": QUERY, "response_a": RESPONSE, "response_b": RESPONSE[:60]}
    response = httpx.post(f"{judge_service.url}/v1/judge/pairwise", json=pair, timeout=600)
    assert response.status_code == 200, response.text
    body = response.json()
    assert [g["order"] for g in body["games"]] == ["ab", "ba"]
    assert all(g["winner"] in ("a", "b", "tie") and g["parse_error"] is None for g in body["games"]), body
    assert body["consistent"] == (body["games"][0]["winner"] == body["games"][1]["winner"])
    assert body["winner"] == (body["games"][0]["winner"] if body["consistent"] else "tie")
