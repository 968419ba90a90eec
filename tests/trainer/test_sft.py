"""`grace sft`: the starting policy folder, loss on responses, section condensing for tiny models."""

from __future__ import annotations

import json
import subprocess
import sys

from services.trainer.sft import condense
from shared.parsing import extract_structured


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


def test_grace_sft_writes_a_servable_policy_folder(tiny_models, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    data = tmp_path / "sft.jsonl"
    rows = [{"query": f"Write report {i}", "response": f"<summary>s{i}</summary><outline>o{i}</outline><answer>a{i} text</answer>"}
            for i in range(6)]  # fmt: skip
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "policy"
    env_cmd = [sys.executable, "-m", "shared.cli", "sft", "--data", str(data), "--out", str(out), "--max-steps", "3",
               "--batch-size", "2", "--base", str(tiny_models.policy)]  # fmt: skip
    proc = subprocess.run(env_cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "steps=3" in proc.stdout
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "sft_state.json"):
        assert (out / name).exists(), name
    config = AutoConfig.from_pretrained(out)
    assert config.rope_parameters["rope_type"] == "default", "YaRN is applied at serve time, never saved"
    state = json.loads((out / "sft_state.json").read_text())
    assert state["steps"] == 3 and state["section_tokens"] > 0 and state["final_loss"] < state["first_loss"] + 1
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert tokenizer.chat_template and model.config.vocab_size == len(tokenizer)
    base = AutoModelForCausalLM.from_pretrained(tiny_models.policy)
    changed = any(not (a == b).all() for a, b in zip(model.parameters(), base.parameters()))
    assert changed, "full-parameter SFT changes the weights"
