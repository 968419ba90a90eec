"""`grace bench reward [--load]` end to end on the tiny models (small workload): figures, files, last-line JSON."""

import json

from services.reward.bench import make_workload, run_bench
from services.reward.load_bench import check_answers, percentile, run_load_bench
from services.reward.options import RewardBenchOptions
from shared.parsing import extract_structured
from shared.schemas import GroupResult, ResponseResult, ScoreResponse


def test_workload_spans_the_requested_lengths(reward_scorer):
    groups = make_workload(reward_scorer.tokenizer, 2, 4, 300, 900, seed=1)
    assert [len(rs) for _, rs in groups] == [4, 4]
    lengths = [
        len(reward_scorer.tokenizer(extract_structured(r).answer, add_special_tokens=False)["input_ids"])
        for _, rs in groups
        for r in rs
    ]
    assert min(lengths) < 400 and max(lengths) > 800


def test_bench_runs_and_prints_json_last(tiny_models, tmp_path, capsys):
    options = RewardBenchOptions(queries=1, responses=3, models=tiny_models.root, max_doc_tokens=420, out_dir=tmp_path,
                                 dtype="fp32", threads=0)  # fmt: skip
    result = run_bench(options)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == result
    assert result["speedup"] > 0 and 0 < result["matmul_bound_fraction"] < 5
    assert result["responses"] == 3 and result["dtype"] == "float32"
    # fp32 service path vs the fp32 naive script, all documents inside the window: the same numbers
    assert result["ppl_max_rel_err_in_window"] < 1e-3 and result["relevance_max_abs_err"] < 1e-3
    assert result["label_agreement"] == 1.0
    assert {p.name for p in tmp_path.iterdir()} >= {"bench_reward.json", "bench_reward.md", "bench_reward.png"}


def _answer(groups: list[tuple[str, int]]) -> ScoreResponse:
    results = [
        GroupResult(query=q, results=[ResponseResult(index=i, parsed=False, weight=-1) for i in range(m)]) for q, m in groups
    ]
    return ScoreResponse(groups=results)


def test_answer_check_finds_lost_duplicated_and_mismatched():
    sent = {"a": [("[a/0] q", 2)], "b": [("[b/0] q", 2)], "c": [("[c/0] q", 3)]}
    answers = [("a", _answer([("[a/0] q", 2)])), ("a", _answer([("[a/0] q", 2)])), ("c", _answer([("[c/0] q", 2)]))]
    assert check_answers(sent, answers) == {"lost": 1, "duplicated": 1, "mismatched": 1}
    assert check_answers(sent, [(k, _answer(v)) for k, v in sent.items()]) == {"lost": 0, "duplicated": 0, "mismatched": 0}
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0 and percentile([3.0, 1.0], 99) == 3.0 and percentile([], 50) is None


def test_load_bench_loses_nothing_and_retries_503s(tiny_models, tmp_path, capsys):
    # its own service admits one job and 2 waiting requests: 4 clients at once must meet 503s
    options = RewardBenchOptions(clients=4, seconds=3, queries=1, responses=4, preset="tiny", dtype="fp32", out_dir=tmp_path)
    result = run_load_bench(options)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == result
    assert {"requests_per_s", "responses_per_s", "latency_p50_s", "latency_p99_s", "busy_503", "lost", "duplicated"} <= set(
        result
    )
    assert result["requests_answered"] == result["requests_sent"] > 4 and result["errors"] == 0
    assert result["lost"] == result["duplicated"] == result["mismatched"] == 0
    assert result["busy_503"] > 0 and result["busy_503_retried"] == result["busy_503"] and result["retry_after_s"] == [1.0]
    assert result["retry_after_honoured"] and result["latency_p50_s"] <= result["latency_p99_s"]
    assert result["responses_scored"] == 4 * result["requests_answered"]
    assert {p.name for p in tmp_path.iterdir()} >= {"bench_reward_load.json", "bench_reward_load.md", "bench_reward_load.png"}
