"""`grace sft`: the starting policy folder, loss on responses, section condensing for tiny models."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys

from services.trainer.sft import QueryGenerationExamples, condense, probe_queries
from shared.parsing import extract_structured, parse_query_list


def write_examples(path, n: int):
    """``n`` tagged SFT examples in a jsonl file."""
    rows = [{"query": f"Write report {i}", "response": f"<summary>s{i}</summary><outline>o{i}</outline><answer>a{i} text</answer>"}
            for i in range(n)]  # fmt: skip
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_condense_cuts_each_section_and_keeps_the_tags(tiny_models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models.policy)
    long = " ".join(f"word{i}" for i in range(200))
    response = f"<summary>{long}</summary><outline>1. a\n2. b</outline><answer>{long}</answer>"
    short = condense(response, tokenizer, 10)
    parts = extract_structured(short)
    assert parts is not None and parts.outline == "1. a\n2. b"
    assert len(tokenizer(parts.answer, add_special_tokens=False)["input_ids"]) <= 10
    assert condense("no tags here", tokenizer, 10) == "no tags here"


def test_condense_draws_answers_of_varied_length_with_answer_tokens(tiny_models):
    import random

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models.policy)
    long = " ".join(f"word{i}" for i in range(400))
    response = f"<summary>{long}</summary><outline>{long}</outline><answer>{long}</answer>"
    rng = random.Random(0)
    lengths = {"summary": set(), "answer": set()}
    for _ in range(30):
        parts = extract_structured(condense(response, tokenizer, 10, rng, answer_tokens=120))
        for name in lengths:
            lengths[name].add(len(tokenizer(getattr(parts, name), add_special_tokens=False)["input_ids"]))
    assert max(lengths["summary"]) <= 11  # the other sections keep the fixed window (a word may merge at a cut)
    assert min(lengths["answer"]) >= 8 and max(lengths["answer"]) <= 121
    assert max(lengths["answer"]) - min(lengths["answer"]) > 50  # lengths spread over the range, not one value


def test_query_generation_turns_look_like_the_rollouts_generation_request(tmp_path):
    from services.orchestrator.rollout import query_list_regex
    from services.rollout.config import RolloutSettings

    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("\n".join(json.dumps({"query": f"Write report {i} on topic {i}", "lang": "en"}) for i in range(7)))
    targets = ['Write the "annual" report:\n1. Background\n2. Results', "请撰写《工作报告》，包含以下部分：\n1. 背景"]
    turns = QueryGenerationExamples(seeds, targets, per_epoch=5).draw(random.Random(0))
    assert len(turns) == 5
    regex = query_list_regex(RolloutSettings())
    for messages, target in turns:
        assert [m["role"] for m in messages] == ["user"]
        assert sum(f"Write report {i} on" in messages[0]["content"] for i in range(7)) == 5, "five seed examples"
        assert re.fullmatch(regex, target), target  # what the rollout's guided decoding can produce
        (query,) = parse_query_list(target)
        assert query in {"Write the annual report: 1. Background 2. Results", "请撰写《工作报告》，包含以下部分： 1. 背景"}
    assert QueryGenerationExamples(seeds, targets, per_epoch=0).draw(random.Random(0)) == []


def test_probe_queries_are_spread_over_the_seed_file(tmp_path):
    path = tmp_path / "seeds.jsonl"
    path.write_text("\n".join(json.dumps({"query": f"q{i}"}) for i in range(10)))
    assert probe_queries(path, 5) == ["q0", "q2", "q4", "q6", "q8"]
    assert probe_queries(path, 20) == [f"q{i}" for i in range(10)]


def test_sft_trains_in_rounds_until_the_sampled_tag_rate_or_max_rounds(tiny_models, tmp_path):
    from services.trainer.sft import SftOptions, run_sft

    data = write_examples(tmp_path / "sft.jsonl", 4)
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("\n".join(json.dumps({"query": f"Write a plan {i}", "lang": "en"}) for i in range(6)))
    common = dict(data=data, base=str(tiny_models.policy), epochs=1, batch_size=4, seed_queries=seeds, probe_size=4,
                  query_generation_examples=4)  # fmt: skip
    # an unreachable target: every round runs, each measured
    result = run_sft(SftOptions(out=tmp_path / "a", target_tag_rate=1.01, max_rounds=2, **common))
    assert [r["round"] for r in result["rounds"]] == [1, 2]
    assert all(0.0 <= r["tag_rate"] <= 1.0 for r in result["rounds"])
    best = max(result["rounds"], key=lambda r: r["tag_rate"])  # the first of equals
    assert result["kept_round"] == best["round"] and result["tag_rate"] == best["tag_rate"]
    assert result["steps"] == 2 * 2, "(4 documents + 4 generation turns) / 4 per step, twice"
    # target 0: no probe, one round
    result = run_sft(SftOptions(out=tmp_path / "b", target_tag_rate=0.0, max_rounds=3, **common))
    assert len(result["rounds"]) == 1 and result["tag_rate"] is None, "target 0 = no probe, one round"


def test_grace_sft_writes_a_servable_policy_folder(tiny_models, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    data = write_examples(tmp_path / "sft.jsonl", 6)
    out = tmp_path / "policy"
    env_cmd = [sys.executable, "-m", "shared.cli", "sft", "--data", str(data), "--out", str(out), "--max-steps", "3",
               "--batch-size", "2", "--base", str(tiny_models.policy), "--query-generation-examples", "0"]  # fmt: skip
    proc = subprocess.run(env_cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "steps=3" in proc.stdout
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "sft_state.json"):
        assert (out / name).exists(), name
    config = AutoConfig.from_pretrained(out)
    assert config.rope_parameters["rope_type"] == "default", "YaRN is applied at serve time, never saved"
    state = json.loads((out / "sft_state.json").read_text())
    assert state["steps"] == 3 and state["section_tokens"] > 0 and state["final_loss"] < state["first_loss"] + 1
    assert len(state["rounds"]) == 1 and 0.0 <= state["tag_rate"] <= 1.0, "max-steps ends the rounds; the rate is measured"
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert tokenizer.chat_template and model.config.vocab_size == len(tokenizer)
    base = AutoModelForCausalLM.from_pretrained(tiny_models.policy)
    changed = any(not (a == b).all() for a, b in zip(model.parameters(), base.parameters()))
    assert changed, "full-parameter SFT changes the weights"
