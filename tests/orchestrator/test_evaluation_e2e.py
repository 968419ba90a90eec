"""`grace eval` end to end on the tiny stack: rollout (vLLM + an adapter), reward service, judge service."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.orchestrator.evaluation import parse_policy_spec
from shared.cli import app
from tests.fixtures.judge import Step
from tests.fixtures.rollout import wait_adapter_status

DATA = Path(__file__).resolve().parents[2] / "data"


def _queries_with_references(path: Path, count: int) -> list[dict]:
    """Test queries plus a labeled answer each (from the SFT data), within the reward service's small limits."""
    rows = [json.loads(line) for line in (DATA / "sft.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if len(r["query"]) <= 400 and len(r["response"]) <= 5000][:count]
    assert len(rows) == count
    path.write_text("".join(json.dumps({"id": f"t{i}", "query": r["query"], "response": r["response"]},
                                       ensure_ascii=False) + "\n" for i, r in enumerate(rows)))  # fmt: skip
    return rows


def test_policy_specs():
    assert parse_policy_spec("policy") == parse_policy_spec("policy=policy")
    spec = parse_policy_spec("GRACE (K=250)=v3@http://10.0.0.5:8000/v1")
    assert (spec.label, spec.model, spec.base_url) == ("GRACE (K=250)", "v3", "http://10.0.0.5:8000/v1")
    assert parse_policy_spec("base@http://h:1/v1").label == "base"


def test_eval_writes_the_papers_tables_and_plot(
    rollout_service, reward_service, judge_service, lora_factory, publish_adapter, scripted_backend, tmp_path
):
    version = f"eval-{time.time_ns()}"
    path, checksum, rank = lora_factory.make(version, rank=8, seed=5, scale=0.3)
    publish_adapter(version, path, checksum, rank)
    assert wait_adapter_status(rollout_service.redis_url, version).status == "loaded"

    queries, out = tmp_path / "queries.jsonl", tmp_path / "eval"
    rows = _queries_with_references(queries, 2)
    # The tiny random policy never writes the three tags, so its responses get no metrics. A third policy at
    # another OpenAI endpoint (the scripted HTTP backend: one choice per request) answers with tagged
    # documents, so Table 1 also holds real values from the reward service.
    # Its second document is over the reward service's size limit: that group alone gets no metrics.
    oversize = rows[1]["response"].replace("</answer>", "。" * 7000 + "</answer>")
    scripted_backend.script(Step(content=rows[0]["response"], match=rows[0]["query"][:30]),
                            Step(content=oversize, match=rows[1]["query"][:30]))  # fmt: skip
    grace = f"GRACE ({version})"
    result = CliRunner().invoke(
        app,
        ["eval", "-p", "Baseline=base", "-p", f"{grace}=policy", "-p", f"Other run=ref@{scripted_backend.url}",
         "--queries", str(queries), "--n", "2",
         "--max-tokens", "96", "--rollout-url", rollout_service.openai_base_url,
         "--rollout-api-key", rollout_service.api_key, "--reward-url", reward_service.url,
         "--reward-api-key", reward_service.api_key, "--reward-batch", "3", "--judge-url", judge_service.url,
         "--reference", "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output

    records = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    # 2 policies x 2 queries x n=2, the other run's one choice per query, one labeled answer per query
    assert len(records) == 2 * 2 * 2 + 2 + 2
    by_policy = {p: [r for r in records if r["policy"] == p] for p in ("Baseline", grace, "Other run", "Labeled Answer")}
    assert all(r["response"] and r["error"] is None for r in records)
    # the adapter is what `policy` served: same seeds, different text
    assert [r["response"] for r in by_policy["Baseline"]] != [r["response"] for r in by_policy[grace]]
    # every parsed response got the five metrics from the reward service; the labeled answers parse
    assert all(r["parsed"] and r["metrics"]["length"] > 0 for r in by_policy["Labeled Answer"])
    first, second = by_policy["Other run"]
    assert first["parsed"] and first["metrics"] == by_policy["Labeled Answer"][0]["metrics"]
    assert second["parsed"] and second["metrics"] is None and "answered 4" in second["metrics_error"]
    assert all((r["metrics"] is not None) == r["parsed"] for r in records if r is not second)
    # every response was judged by the tiny judge through vLLM structured output
    assert all(r["judge"] is not None and r["judge_error"] is None for r in records), [r["judge_error"] for r in records]
    # with the tokens vLLM counted and their cost at the judge service's prices, per record and in total
    assert all(r["judge_usage"]["prompt_tokens"] > 0 and r["judge_cached"] is False for r in records)

    total = json.loads((out / "summary.json").read_text())["judge_usage"]
    assert total["judgments"] == len(records) and total["cost"] == pytest.approx(sum(r["judge_usage"]["cost"] for r in records))
    summary = json.loads((out / "summary.json").read_text())["policies"]
    assert summary["Other run"]["length"] == by_policy["Labeled Answer"][0]["metrics"]["length"] > 0
    for label in ("Baseline", grace):
        assert summary[label]["judged"] == 4 and 10 <= summary[label]["judge_score"] <= 100

    automatic = (out / "table_automatic.md").read_text().splitlines()
    assert automatic[0] == "| Method | L | E | P | Rs | Rd | Avg. Rank |"
    # no parsed response: a dash, ranked last (tied); the other run ranks first in every column
    assert automatic[2] == "| Baseline | - (2.5) | - (2.5) | - (2.5) | - (2.5) | - (2.5) | 2.5 |"
    assert automatic[3].startswith(f"| {grace} | - (2.5) |")
    assert automatic[4].startswith("| Other run | ") and automatic[4].count("(1)") == 5 and automatic[4].endswith("| 1.0 |")
    assert automatic[5].startswith("| Labeled Answer | ") and automatic[5].endswith("| - |")  # unranked
    judge_table = (out / "table_judge.md").read_text().splitlines()
    assert judge_table[0] == "| Method | CAR | TF | IDA | SC | PE | Avg. | Avg. Rank |"
    ranks = [float(line.rsplit("|", 2)[1]) for line in judge_table[2:5]]
    assert sum(ranks) == 6.0 and all(1.0 <= r <= 3.0 for r in ranks)  # three ranked methods, ranks 1..3
    assert (out / "zscores.png").read_bytes()[:4] == b"\x89PNG"
    report = (out / "report.md").read_text()
    assert "Tables 1/4" in report and "Table 2" in report and "zscores.png" in report
