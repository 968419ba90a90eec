"""`grace eval` with the judge backend called directly (no judge service) and no reward service: records,
usage and cost, reference answers, null scores, the judgment cache."""

from __future__ import annotations

import email.utils
import json
import time

import pytest

from services.orchestrator.evaluation import EvalOptions, PolicySpec, run_eval
from shared.prompts import STRUCTURED_SYSTEM_PROMPT
from shared.service_client import retry_after_seconds
from tests.fixtures.judge import Step

DOCUMENT = "<summary>要点</summary><outline>一、二、</outline><answer>正文第一段。正文第二段。</answer>"


def test_eval_judges_through_the_backend_directly(backend, tmp_path, monkeypatch):
    monkeypatch.setenv("GRACE_JUDGE_BASE_URL", backend.url)
    monkeypatch.setenv("GRACE_JUDGE_MODEL", "judge-model")
    queries = tmp_path / "queries.jsonl"
    queries.write_text(
        "".join(json.dumps({"id": f"q{i}", "query": f"请撰写报告 {i}"}, ensure_ascii=False) + "\n" for i in range(2))
    )
    backend.script(
        Step(content=DOCUMENT, match="请撰写报告 0"), Step(content="no tags at all", match="请撰写报告 1"),
        Step(503),  # the first judge request fails once and is retried (by the openai SDK)
    )  # fmt: skip
    out = tmp_path / "eval"
    opts = EvalOptions(
        policies=[PolicySpec("Stage 1", "gen-model", backend.url)], queries=queries, out_dir=out,
        reward_url=None, judge_url=None, stages=True,
    )  # fmt: skip
    summary = run_eval(opts, progress=False)["policies"]["Stage 1"]
    assert (summary["responses"], summary["judged"], summary["judge_errors"]) == (2, 2, 0)
    assert summary["judge_score"] == pytest.approx(72.0)
    assert summary["length"] is None  # no reward service: no automatic metrics

    bodies = [body for _, body in backend.calls]
    generations = [b for b in bodies if b["model"] == "gen-model"]
    judgements = [b for b in bodies if b["model"] == "judge-model"]
    assert len(generations) == 2 and len(judgements) == 3
    assert generations[0]["messages"][0] == {"role": "system", "content": STRUCTURED_SYSTEM_PROMPT}
    assert all(b["response_format"]["type"] == "json_schema" for b in judgements)
    prompts = [b["messages"][0]["content"] for b in judgements]
    # a parsed response is judged on its document (<answer>), an unparsed one on its whole text
    assert any("<Response>正文第一段。正文第二段。</Response>" in p for p in prompts)
    assert any("<Response>no tags at all</Response>" in p for p in prompts)

    assert (out / "table_judge.md").read_text().startswith("| Training Progress | CAR |")
    assert (out / "zscores.png").stat().st_size > 0
    records = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert [r["parsed"] for r in records] == [True, False]


def test_reevaluation_is_free_from_the_cache_and_unparsed_judgments_are_null_scores(
    backend, redis_client, redis_url, tmp_path, monkeypatch
):
    monkeypatch.setenv("GRACE_JUDGE_BASE_URL", backend.url)
    monkeypatch.setenv("GRACE_JUDGE_MODEL", "judge-model")
    monkeypatch.setenv("GRACE_JUDGE_CACHE_URL", redis_url)
    monkeypatch.setenv("GRACE_JUDGE_PARSE_RETRIES", "1")
    monkeypatch.setenv("GRACE_JUDGE_PROMPT_PRICE_PER_1M", "3.0")
    monkeypatch.setenv("GRACE_JUDGE_COMPLETION_PRICE_PER_1M", "15.0")
    queries = tmp_path / "queries.jsonl"
    rows = [{"id": "q0", "query": "请撰写报告 0", "response": "参考答案零"}, {"id": "q1", "query": "请撰写报告 1"}]
    queries.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    unjudgeable = Step(content="A fine report.", match="<Response>no tags at all</Response>")
    backend.script(
        Step(content=DOCUMENT, match="请撰写报告 0"),
        Step(content="no tags at all", match="请撰写报告 1"),
        unjudgeable,
        unjudgeable,
    )
    opts = EvalOptions(
        policies=[PolicySpec("Run", "gen-model", backend.url)], queries=queries, out_dir=tmp_path / "first",
        reward_url=None, judge_url=None, judge_reference=True,
    )  # fmt: skip
    first = run_eval(opts, progress=False)
    records = [json.loads(line) for line in (tmp_path / "first" / "responses.jsonl").read_text().splitlines()]
    scored, unparsed = records
    # the query with a labeled answer is judged against it; the other has none
    prompts = [b["messages"][0]["content"] for _, b in backend.calls if b["model"] == "judge-model"]
    assert sum("<Reference Answer>参考答案零</Reference Answer>" in p for p in prompts) == 1
    assert sum("<Reference Answer>" in p for p in prompts) == 1
    assert scored["judge"]["score"] == pytest.approx(72.0) and scored["judge_cached"] is False
    assert scored["judge_usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 10,
        "total_tokens": 20,
        "cost": pytest.approx(1.8e-4),
    }
    # an answer that never parsed: a null score with its reason, not an error, and its two answers were paid for
    assert (unparsed["judge"], unparsed["judge_error"]) == (None, None)
    assert "could not be judged" in unparsed["judge_parse_error"] and unparsed["judge_usage"]["total_tokens"] == 40
    policy = first["policies"]["Run"]
    assert (policy["judged"], policy["judge_errors"]) == (1, 0)
    assert first["judge_usage"] == {"judgments": 2, "unparsed": 1, "cached": 0, "prompt_tokens": 30, "completion_tokens": 30,
                                    "total_tokens": 60, "cost": pytest.approx(30 * 3e-6 + 30 * 15e-6)}  # fmt: skip
    assert "Judge: 2 judgments (1 without scores, 0 from the cache)" in (tmp_path / "first" / "report.md").read_text()

    # the same evaluation again: the scored judgment comes from the cache; only the unparsed one is asked again
    backend.script(Step(content=DOCUMENT, match="请撰写报告 0"), Step(content="no tags at all", match="请撰写报告 1"))
    opts.out_dir = tmp_path / "second"
    again = run_eval(opts, progress=False)
    assert [b["model"] for _, b in backend.calls].count("judge-model") == 1
    assert again["policies"]["Run"]["judge_score"] == pytest.approx(72.0)
    assert (again["judge_usage"]["cached"], again["judge_usage"]["unparsed"]) == (1, 0)
    assert again["judge_usage"]["total_tokens"] == 20  # only the answer asked again cost anything


def test_retry_after_header_of_a_busy_service():
    assert retry_after_seconds({"retry-after": "2"}) == 2.0
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_seconds({"retry-after": "-5"}) == 0.0
    assert retry_after_seconds({"retry-after": "soon"}) is None
    assert retry_after_seconds({}) is None and retry_after_seconds(None) is None
    now = time.time()
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert retry_after_seconds({"retry-after": date}, now=now) == pytest.approx(30, abs=1.0)
