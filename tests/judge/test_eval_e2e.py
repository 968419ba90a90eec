"""`grace eval` end to end on the tiny stack: rollout (vLLM + an adapter), reward service, judge service."""

from __future__ import annotations

import json
import time
from pathlib import Path

from typer.testing import CliRunner

from services.judge.eval import parse_policy_spec
from shared.cli import app
from tests.fixtures.rollout import wait_adapter_status

DATA = Path(__file__).resolve().parents[2] / "data"


def _queries_with_references(path: Path, count: int) -> None:
    """Test queries plus a labeled answer each (from the SFT data), within the reward service's small limits."""
    rows = [json.loads(line) for line in (DATA / "sft.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if len(r["query"]) <= 400 and len(r["response"]) <= 5000][:count]
    assert len(rows) == count
    path.write_text("".join(json.dumps({"id": f"t{i}", "query": r["query"], "response": r["response"]},
                                       ensure_ascii=False) + "\n" for i, r in enumerate(rows)))  # fmt: skip


def test_policy_specs():
    assert parse_policy_spec("policy") == parse_policy_spec("policy=policy")
    spec = parse_policy_spec("GRACE (K=250)=v3@http://10.0.0.5:8000/v1")
    assert (spec.label, spec.model, spec.base_url) == ("GRACE (K=250)", "v3", "http://10.0.0.5:8000/v1")
    assert parse_policy_spec("base@http://h:1/v1").label == "base"


def test_eval_writes_the_papers_tables_and_plot(
    rollout_service, reward_service, judge_service, lora_factory, publish_adapter, tmp_path
):
    version = f"eval-{time.time_ns()}"
    path, checksum, rank = lora_factory.make(version, rank=8, seed=5, scale=0.3)
    publish_adapter(version, path, checksum, rank)
    assert wait_adapter_status(rollout_service.redis_url, version).status == "loaded"

    queries, out = tmp_path / "queries.jsonl", tmp_path / "eval"
    _queries_with_references(queries, 2)
    grace = f"GRACE ({version})"
    result = CliRunner().invoke(
        app,
        ["eval", "-p", "Baseline=base", "-p", f"{grace}=policy", "--queries", str(queries), "--n", "2",
         "--max-tokens", "96", "--rollout-url", rollout_service.openai_base_url,
         "--rollout-api-key", rollout_service.api_key, "--reward-url", reward_service.url,
         "--reward-api-key", reward_service.api_key, "--reward-batch", "3", "--judge-url", judge_service.url,
         "--reference", "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output

    records = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 2 * 2 + 2  # policies x queries x n, plus one labeled answer per query
    by_policy = {p: [r for r in records if r["policy"] == p] for p in ("Baseline", grace, "Labeled Answer")}
    assert all(r["response"] and r["error"] is None for r in records)
    # the adapter is what `policy` served: same seeds, different text
    assert [r["response"] for r in by_policy["Baseline"]] != [r["response"] for r in by_policy[grace]]
    # every parsed response got the five metrics from the reward service; the labeled answers parse
    assert all(r["parsed"] and r["metrics"]["length"] > 0 for r in by_policy["Labeled Answer"])
    assert all((r["metrics"] is not None) == r["parsed"] for r in records)
    # every response was judged by the tiny judge through vLLM structured output
    assert all(r["judge"] is not None and r["judge_error"] is None for r in records), [r["judge_error"] for r in records]

    summary = json.loads((out / "summary.json").read_text())["policies"]
    assert summary["Labeled Answer"]["length"] > 0
    for label in ("Baseline", grace):
        assert summary[label]["judged"] == 4 and 10 <= summary[label]["judge_score"] <= 100

    automatic = (out / "table_automatic.md").read_text().splitlines()
    assert automatic[0] == "| Method | L | E | P | Rs | Rd | Avg. Rank |"
    assert automatic[2].startswith("| Baseline | ") and automatic[3].startswith(f"| {grace} | ")
    assert automatic[4].startswith("| Labeled Answer | ") and automatic[4].endswith("| - |")  # unranked
    judge_table = (out / "table_judge.md").read_text().splitlines()
    assert judge_table[0] == "| Method | CAR | TF | IDA | SC | PE | Avg. | Avg. Rank |"
    ranks = [float(line.rsplit("|", 2)[1]) for line in judge_table[2:4]]
    assert sorted(ranks) in ([1.0, 2.0], [1.5, 1.5]) or sum(ranks) == 3.0  # two ranked methods share ranks 1 and 2
    assert (out / "zscores.png").read_bytes()[:4] == b"\x89PNG"
    report = (out / "report.md").read_text()
    assert "Tables 1/4" in report and "Table 2" in report and "zscores.png" in report
