"""`grace bench reward` end to end on the tiny models (small workload): figures, files, last-line JSON."""

import json

from services.reward.bench import make_workload, run_bench
from shared.parsing import extract_structured


def test_workload_spans_the_requested_lengths(reward_scorer):
    groups = make_workload(reward_scorer.tokenizer, 2, 4, 300, 900, seed=1)
    assert [len(rs) for _, rs in groups] == [4, 4]
    lengths = [len(reward_scorer.tokenizer(extract_structured(r).answer, add_special_tokens=False)["input_ids"]) for _, rs in groups for r in rs]
    assert min(lengths) < 400 and max(lengths) > 800


def test_bench_runs_and_prints_json_last(tiny_models, tmp_path, capsys):
    result = run_bench(queries=1, responses=3, models_dir=tiny_models.root, max_doc_tokens=420, out_dir=tmp_path, dtype="fp32")
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == result
    assert result["speedup"] > 0 and 0 < result["matmul_bound_fraction"] < 5
    assert result["responses"] == 3 and result["dtype"] == "float32"
    # fp32 service path vs the fp32 naive script, all documents inside the window: the same numbers
    assert result["ppl_max_rel_err_in_window"] < 1e-3 and result["relevance_max_abs_err"] < 1e-3
    assert result["label_agreement"] == 1.0
    assert {p.name for p in tmp_path.iterdir()} >= {"bench_reward.json", "bench_reward.md", "bench_reward.png"}
