"""`grace eval` with the judge backend called directly (no judge service) and no reward service."""

from __future__ import annotations

import json

import pytest

from services.orchestrator.evaluation import EvalOptions, PolicySpec, run_eval
from shared.prompts import STRUCTURED_SYSTEM_PROMPT
from tests.fixtures.judge import Step

DOCUMENT = "<summary>要点</summary><outline>一、二、</outline><answer>正文第一段。正文第二段。</answer>"


def test_eval_judges_through_the_backend_directly(backend, tmp_path, monkeypatch):
    monkeypatch.setenv("GRACE_JUDGE_BASE_URL", backend.url)
    monkeypatch.setenv("GRACE_JUDGE_MODEL", "judge-model")
    monkeypatch.setenv("GRACE_JUDGE_BACKOFF_BASE_S", "0.01")
    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(json.dumps({"id": f"q{i}", "query": f"请撰写报告 {i}"}, ensure_ascii=False) + "\n" for i in range(2)))
    backend.script(
        Step(content=DOCUMENT, match="请撰写报告 0"), Step(content="no tags at all", match="请撰写报告 1"),
        Step(503),  # the first judge request fails once and is retried
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
