"""`grace plan`: the formulas against hand calculations, the split search, the CLI's JSON line."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from services.orchestrator import plan as P

QWEN = P.MODEL_PRESETS["qwen2.5-7b"]
BGE = P.MODEL_PRESETS["bge-m3"]
# 2 layers, hidden 8, 2 heads of 4, 1 KV head, SwiGLU 16, vocab 10, untied head
SMALL = P.ModelShape("small", layers=2, hidden=8, intermediate=16, heads=2, kv_heads=1, head_dim=4, vocab=10, window=64)


def paper_inputs(**overrides) -> P.PlanInputs:
    settings = {"device": P.DEVICES["h200"], "gpus": 8, "k": 250, "m": 8, "doc_tokens": 5400, **overrides}
    return P.PlanInputs(policy=QWEN, general=QWEN, domain=QWEN, encoder=BGE, **settings)


# --------------------------------------------------------------------------- shapes and parameter counts


def test_qwen_7b_parameters_match_the_public_count():
    # per block: q,o 3584^2 each, k,v 3584x512 each, gate/up/down 3584x18944 each = 233,046,016; x 28
    assert QWEN.layer_params == 2 * 3584 * 3584 + 2 * 3584 * 512 + 3 * 3584 * 18944 == 233_046_016
    # + embedding and untied LM head, 152064 x 3584 each; biases and norms (0.33M) left out
    assert QWEN.params == 28 * 233_046_016 + 2 * 152064 * 3584 == 7_615_283_200
    assert abs(QWEN.params - 7.6156e9) / 7.6156e9 < 1e-4  # Qwen2.5-7B: 7.62B


def test_bge_m3_parameters_match_the_public_count():
    # XLM-R large: 24 x (4 x 1024^2 + 2 x 1024 x 4096) + (250002 + 8194) x 1024 + colbert/sparse heads
    assert BGE.params == 24 * (4 * 1024**2 + 2 * 1024 * 4096) + (250002 + 8194) * 1024 + 1024 * 1024 + 1024
    assert abs(BGE.params - 568e6) / 568e6 < 0.005  # BGE-M3: 568M


def test_config_json_reads_the_same_shape_as_the_preset(tmp_path):
    config = {"model_type": "qwen2", "hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
              "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064,
              "max_position_embeddings": 32768, "tie_word_embeddings": False}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert replace(P.load_shape(str(tmp_path)), name=QWEN.name) == QWEN
    encoder = {"model_type": "xlm-roberta", "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
               "intermediate_size": 4096, "vocab_size": 250002, "max_position_embeddings": 8194}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(encoder))
    assert replace(P.load_shape(str(tmp_path), "encoder"), name=BGE.name) == BGE


def test_unknown_model_spec_names_the_presets():
    with pytest.raises(ValueError, match="qwen2.5-7b"):
        P.load_shape("/nonexistent/model")


# --------------------------------------------------------------------------- FLOPs and bytes


def test_forward_flops_of_a_small_decoder_by_hand():
    # linears per block: q 8x8 + k 8x4 + v 8x4 + o 8x8 + gate/up/down 3 x 8x16 = 576; 2 blocks = 1152
    # 4 tokens: matmuls 2 x 1152 x 4 = 9216; causal attention 4 x 2 layers x q_dim 8 x (1+2+3+4) = 640;
    # LM head 2 x 10 x 8 x 4 tokens = 640
    assert SMALL.layer_params == 576
    assert P.attention_flops(SMALL, 4) == 640
    assert P.forward_flops(SMALL, 4) == 9216 + 640 + 640 == 10496
    assert P.forward_flops(SMALL, 4, lm_head_tokens=1) == 9216 + 640 + 160


def test_forward_flops_of_an_encoder_is_bidirectional_and_headless():
    enc = replace(SMALL, causal=False, gated_mlp=False, kv_heads=2, extra_linear=0)
    # linears: q,k,v,o 8x8 each + up/down 8x16 each = 512 per block; attention sees all 4 x 4 pairs
    assert enc.layer_params == 512
    assert P.forward_flops(enc, 4) == 2 * 1024 * 4 + 4 * 2 * 8 * 16


def test_issue_estimate_of_the_reward_flops():
    # issue 16: 2 models x 2 x 7e9 x 1.08e7 tokens ~ 3e17 FLOPs per iteration
    p = paper_inputs()
    parts = P.reward_flops_per_response(p)
    lm = p.responses * (parts["general"] + parts["domain"])
    assert 3.0e17 < lm < 3.6e17  # 7.6B params, + attention and the LM head
    # "one H200 at 40% of its bf16 peak needs about 15 minutes"
    assert 10 * 60 < P.reward_stage(p, 1).seconds < 16 * 60


def test_kv_cache_bytes_per_token_qwen_7b():
    # 28 layers x 4 KV heads x 128 head_dim x 2 (K, V) x 2 bytes
    assert P.kv_bytes_per_token(QWEN) == 28 * 4 * 128 * 2 * 2 == 57_344
    assert P.kv_bytes_per_token(QWEN, dtype_bytes=1) == 28_672


def test_lora_parameter_count_by_hand():
    # r (in + out) per module: q,o 64 x 7168; k,v 64 x 4096; gate,up,down 64 x 22528; x 28 blocks
    per_block = 2 * 64 * 7168 + 2 * 64 * 4096 + 3 * 64 * 22528
    assert P.lora_params(QWEN, 64) == 28 * per_block == 161_480_704
    assert P.lora_params(QWEN, 8, ("q_proj", "v_proj")) == 28 * 8 * ((3584 + 3584) + (3584 + 512)) == 2_523_136
    assert P.lora_params(BGE, 8, ("gate_proj",)) == 0  # no such module in a GELU MLP


def test_adamw_memory_of_the_lora_parameters():
    # fp32 weights + grads + two moments: 16 B per trainable parameter
    assert P.optimizer_bytes(161_480_704) == 16 * 161_480_704 == 2_583_691_264
    mem = P.trainer_memory(paper_inputs())
    assert mem.weights + mem.optimizer == pytest.approx(P.weight_bytes(QWEN, 2, nf4=True) + 16 * 161_480_704)


def test_weight_bytes_bf16_and_nf4():
    assert P.weight_bytes(QWEN) == 2 * QWEN.params
    assert P.NF4_BITS_PER_PARAM == pytest.approx(4.127, abs=1e-3)  # QLoRA paper, double quantization
    nf4 = P.weight_bytes(QWEN, nf4=True)
    assert nf4 == pytest.approx(28 * 233_046_016 * 4.127 / 8 + 2 * 152064 * 3584 * 2, rel=1e-4)
    assert 5e9 < nf4 < 6.5e9


def test_activation_bytes_per_token_by_hand():
    # per block, bf16: 4 h + 2 q_dim + 2 kv_dim + 4 I = 32 + 16 + 8 + 64 = 120 elements = 240 bytes
    assert P.activation_bytes_per_token(SMALL, checkpointing=False) == 2 * 240
    # checkpointing: the block inputs (2 x 8 x 2 bytes) + one block recomputed
    assert P.activation_bytes_per_token(SMALL, checkpointing=True) == 32 + 240


def test_sliding_windows_cover_the_document():
    assert P._windows(10, 4) == [4, 4, 4]  # stride 3: [0,4) [3,7) [6,10)
    assert P._windows(3, 4) == [3]
    assert sum(P._windows(5400, 32768)) == 5400


# --------------------------------------------------------------------------- stages


def test_decode_batch_is_what_the_kv_cache_holds():
    tight = replace(P.DEVICES["h200"], memory=24e9)  # ~21.6 GB share - 15.2 GB weights - 2 GiB reserve
    p = paper_inputs(device=tight, lora_rank=8)
    kv_tokens = P.rollout_memory(p).kv_cache / P.kv_bytes_per_token(QWEN)
    stage = P.rollout_stage(p, 1)
    assert stage.detail["batch"] == int(kv_tokens // p.sequence_tokens) < p.max_num_seqs
    assert stage.bound == "memory"


def test_rollout_is_memory_bound_and_scales_with_replicas():
    p = paper_inputs()
    one, two = P.rollout_stage(p, 1), P.rollout_stage(p, 2)
    assert one.bound == "memory" and one.detail["batch"] == 256
    assert two.seconds == pytest.approx(one.seconds / 2, rel=0.05)


def test_trainer_flops_factors():
    p = paper_inputs(epochs=1)
    fwd = P.forward_flops(QWEN, p.sequence_tokens)
    parts = P.trainer_flops(p)
    assert parts["reference"] == 2 * 2000 * fwd
    assert parts["train"] == 3 * 2000 * fwd  # fwd + bwd (input grads) + recompute
    assert P.trainer_flops(replace(p, gradient_checkpointing=False))["train"] == 2 * 2000 * fwd
    assert P.trainer_stage(replace(p, qlora=False), 1).seconds * P.QLORA_SLOWDOWN == pytest.approx(
        P.trainer_stage(p, 1).seconds, rel=1e-9
    )


def test_split_search_picks_the_obvious_optimum(monkeypatch):
    # work 1 : 1 : 6 that divides over the GPUs: minimise 1/r + 1/w + 6/t with r + w + t = 8 -> (2, 2, 4)
    monkeypatch.setattr(P, "rollout_stage", lambda p, g: P.Stage(1.0 / g, "memory"))
    monkeypatch.setattr(P, "reward_stage", lambda p, g: P.Stage(1.0 / g, "compute"))
    monkeypatch.setattr(P, "trainer_stage", lambda p, g: P.Stage(6.0 / g, "compute"))
    monkeypatch.setattr(P, "eval_stage", lambda p, r, w: P.Stage(0.0, "none"))
    split, seconds = P.best_split(paper_inputs())
    assert split == (2, 2, 4)
    assert seconds == pytest.approx(0.5 + 0.5 + 1.5 + P.swap_stage(paper_inputs()).seconds)
    assert len(P.splits(8)) == 21  # compositions of 8 into 3 positive parts


def test_paper_setting_on_one_h200_node():
    plan = P.make_plan(paper_inputs())
    summary = plan.summary()
    assert sum(plan.split) == 8 and min(plan.split) >= 1
    assert all(v is not None and v > 0 for v in summary["stages_s"].values())
    assert all(m["fits"] for m in summary["memory_gb"].values())
    assert summary["critical_path"] == ["rollout", "reward", "trainer", "swap", "eval"]
    # the chosen split beats every other one
    assert plan.iteration_s == pytest.approx(min(P.iteration_seconds(plan.inputs, s) for s in P.splits(8)))
    assert plan.time_shared_s < plan.iteration_s
    growth = {(row["vary"], row["value"]): row["iteration_s"] for row in summary["growth"]}
    assert growth[("k", 500)] > growth[("k", 250)] > growth[("k", 125)]
    assert growth[("doc_tokens", 10800)] > 2 * growth[("doc_tokens", 5400)] * 0.9
    assert "| rollout |" in P.markdown(plan)


def test_a_model_too_large_for_the_gpu_is_reported_not_hidden():
    small_gpu = replace(P.DEVICES["l40s"], name="16 GB", memory=16e9)
    plan = P.make_plan(paper_inputs(device=small_gpu, gpus=8, qlora=False), split=(2, 3, 3))
    summary = plan.summary()
    assert summary["memory_gb"]["trainer"]["fits"] is False  # 15.2 GB bf16 weights + activations > 16 GB
    assert summary["stages_s"]["trainer"] is None and math.isinf(plan.iteration_s)
    assert summary["memory_gb"]["reward"]["gpus_per_instance"] == 3  # 31.6 GB of weights over 16 GB GPUs
    assert "does not fit" in P.markdown(plan)


def test_one_gpu_colocates_the_services_and_splits_its_memory():
    plan = P.make_plan(paper_inputs(gpus=1))
    summary = plan.summary()
    assert plan.split == (1, 1, 1) and summary["colocated"] is True
    reward, trainer = P.reward_memory(plan.inputs), P.trainer_memory(plan.inputs)
    share = summary["gpu_memory_utilization"]
    assert share == round((141e9 - reward.total - trainer.total) / 141e9 - 0.02, 2)
    assert share * 141e9 + reward.total + trainer.total <= 141e9
    assert "--gpu-memory-utilization" in P.markdown(plan)


# --------------------------------------------------------------------------- CLI


def _last_json(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


def test_cli_prints_the_table_and_json_on_its_last_line():
    from shared.cli import app

    result = CliRunner().invoke(app, ["plan", "--gpu", "h200", "--gpus", "8", "-k", "250", "-m", "8",
                                      "--doc-tokens", "5400"])  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = _last_json(result.output)
    assert set(summary["stages_s"]) == {"rollout", "reward", "trainer", "swap", "eval"}
    assert sum(summary["best_split"].values()) == 8
    assert summary["memory_gb"]["trainer"]["fits"] is True
    assert "| stage | GPUs | time |" in result.output


def test_cli_custom_device_and_fixed_split():
    from shared.cli import app

    result = CliRunner().invoke(app, ["plan", "--peak-tflops", "100", "--bandwidth-gbs", "1000", "--memory-gb", "80",
                                      "--gpus", "4", "--split", "1,1,2", "--no-qlora"])  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = _last_json(result.output)
    assert summary["best_split"] == {"rollout": 1, "reward": 1, "trainer": 2}
    assert summary["device"].startswith("custom")


def test_demo_check_on_this_cpu(tmp_path):
    """The tiny set on this CPU's measured constants: the prediction `grace plan --demo --compare` checks."""
    from shared.cli import app

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(r) for r in (
        {"stage": "eval", "label": "base"}, {"stage": "iteration", "iteration": 1, "seconds": 30.0})))  # fmt: skip
    result = CliRunner().invoke(app, ["plan", "--demo", "--compare", str(tmp_path)])
    assert result.exit_code == 0, result.output
    summary = _last_json(result.output)
    assert summary["k"] == 16 and summary["m"] == 8 and summary["iterations"] == 3
    assert summary["measured"]["matmul_fp32_gflop_s"] > 0 and summary["measured"]["copy_gb_s"] > 0
    # seconds to minutes per stage on a CPU, never hours: overheads, not FLOPs, dominate the tiny set
    assert 1 < summary["iteration_s"] < 600
    assert summary["compare"]["ratio_measured_over_predicted"] == [round(30.0 / summary["compare"]["predicted_iteration_s"], 2)]
