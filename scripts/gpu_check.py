"""The GPU code paths, run for real on a lent CUDA machine (``scripts/gpu-check.sh``); each check reports
what ran. On a machine without CUDA the CUDA-only checks say they were skipped, and the reward check
compares CPU bf16 with CPU fp32 instead, so the script itself is tested here (tests/deploy/test_gpu_check.py).

Checks:
- ``qlora_nf4``: one GRACE-KTO step on the tiny policy loaded in 4-bit nf4 (bitsandbytes), LoRA on top;
- ``deepspeed_zero2``: one GRACE-KTO step under DeepSpeed ZeRO-2 (one rank, the trainer's own config file);
- ``reward_bf16``: the reward metrics on CUDA in bf16 against CPU fp32 on the same responses, within
  ``TOLERANCE`` (L and E exact; perplexities relative; relevance absolute);
- ``losses_0p5b``: one epoch of GRACE-KTO, KTO, DPO and GRPO (same samples, bf16, LoRA r=64, the trainer's
  token budget) on a randomly initialised Qwen2-0.5B-shaped policy: tokens/s and peak CUDA memory each,
  and GRACE-KTO again on the same base in 4-bit nf4 (QLoRA);
- ``long_context``: one GRACE-KTO step on two 32k-token samples of that policy with YaRN (factor 4 over
  an 8k native window, rope_scope=inference_and_training) and gradient checkpointing: peak memory and time;
- ``attention``: the SDPA kernel each attention path (transformers' ``sdpa``, the trainer's
  ``grace_fused_sdpa``) reaches on an 8k-token forward+backward, each backend allowed alone;
- ``profile``: torch.profiler's top operators of one GRACE-KTO epoch (QLoRA, the CUDA default).

Results of a run on one H200: docs/gpu/ and the README's "GPU check".

The last stdout line is the report as JSON; ``--out DIR`` also writes it to ``DIR/gpu-check.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import random
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# bf16 against fp32 on the tiny models: L/E count tokens (exact); PPL relative; Rs/Rd cosine-like scores
TOLERANCE = {"length": 0.0, "diversity": 0.0, "general_perplexity": 0.05, "domain_perplexity": 0.05, "relevance_summary": 0.05,
             "relevance_document": 0.05}  # fmt: skip


def _samples(n: int = 8):
    from shared.schemas import WeightedSample

    rows = [json.loads(line) for line in (ROOT / "data" / "sft.jsonl").read_text(encoding="utf-8").splitlines()][:n]
    rng = random.Random(0)
    return [WeightedSample(run_id="gpu-check", iteration=0, sample_id=f"g{i // 4}:{i % 4}", group_id=f"g{i // 4}",
                           response_index=i % 4, query=r["query"], response=r["response"], weight=(w := rng.uniform(-2, 2)),
                           label="desirable" if w >= 0 else "undesirable", parsed=True) for i, r in enumerate(rows)]  # fmt: skip


def _train_step(models, **overrides) -> dict:
    from services.trainer.config import TrainerSettings
    from services.trainer.model import load_policy
    from services.trainer.train import Trainer, init_distributed

    settings = TrainerSettings(policy_model=str(models.policy), lora_rank=8, lora_alpha=16, batch_size=8, epochs=1,
                               micro_batch_tokens=4096, num_threads=None, **overrides)  # fmt: skip
    init_distributed(settings)
    torch.cuda.reset_peak_memory_stats()
    model, tokenizer, runtime = load_policy(settings)
    started = time.perf_counter()
    result = Trainer(model, tokenizer, settings, runtime).train(_samples())
    row = result.metrics[-1]
    assert result.steps == 1 and torch.isfinite(torch.tensor(row["loss"])), row
    four_bit = sum(type(m).__name__ == "Linear4bit" for m in model.modules())
    return {"loss": row["loss"], "grad_norm": row["grad_norm"], "seconds": round(time.perf_counter() - started, 2),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3), "linear4bit_modules": four_bit,
            "precision": str(runtime.dtype), "attn": runtime.attn_implementation}  # fmt: skip


def check_qlora(models) -> dict:
    if not torch.cuda.is_available():
        return {"status": "skipped", "reason": "CUDA not available (bitsandbytes nf4 needs it)"}
    out = _train_step(models, quantization="nf4", precision="bf16")
    assert out["linear4bit_modules"] > 0, "the base was not loaded in 4-bit"
    return {"status": "ok", **out}


def check_zero2(models) -> dict:
    if not torch.cuda.is_available():
        return {"status": "skipped", "reason": "CUDA not available (DeepSpeed ZeRO needs NCCL)"}
    if importlib.util.find_spec("deepspeed") is None:
        return {"status": "skipped", "reason": "deepspeed not installed (scripts/gpu-wheels.sh carries it)"}
    for key, value in {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29511",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
    }.items():
        os.environ.setdefault(key, value)
    zero2 = ROOT / "services" / "trainer" / "deepspeed" / "zero2.json"
    return {"status": "ok", **_train_step(models, deepspeed=str(zero2), quantization="none", precision="bf16")}


# Qwen2-0.5B's shape (config.json of Qwen/Qwen2-0.5B); random weights: speed and memory depend on the shape only
QWEN2_0P5B = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
              "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 8192, "rope_theta": 1e6,
              "tie_word_embeddings": True, "rms_norm_eps": 1e-6}  # fmt: skip


BUILD_DEVICE = "cuda"


def _qwen2_0p5b(models, folder: Path = Path("/tmp/gpu-check-qwen2-0p5b")) -> Path:
    """A Qwen2-0.5B-shaped policy with random bf16 weights and the tiny set's tokenizer (ids < its vocab)."""
    import shutil

    from transformers import Qwen2Config, Qwen2ForCausalLM

    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        with torch.device(BUILD_DEVICE):
            model = Qwen2ForCausalLM(Qwen2Config(**QWEN2_0P5B)).to(torch.bfloat16)
        model.save_pretrained(folder)
        for item in Path(models.tokenizer).iterdir():
            if item.is_file():
                shutil.copy(item, folder / item.name)
        del model
        torch.cuda.empty_cache()
    return folder


def _epoch(path: Path, samples, loss: str, **overrides) -> dict:
    from services.trainer.config import TrainerSettings
    from services.trainer.model import load_policy
    from services.trainer.train import Trainer

    settings = TrainerSettings(**{"policy_model": str(path), "lora_rank": 64, "lora_alpha": 128, "batch_size": 8, "epochs": 1,
                                  "precision": "bf16", "quantization": "none", "num_threads": None, **overrides})  # fmt: skip
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model, tokenizer, runtime = load_policy(settings)
    loaded = torch.cuda.max_memory_allocated()
    torch.cuda.synchronize()
    started = time.perf_counter()
    result = Trainer(model, tokenizer, settings, runtime, loss=loss).train(samples)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    assert all(math.isfinite(row["loss"]) for row in result.metrics), result.metrics
    out = {"steps": result.steps, "tokens": result.tokens, "seconds": round(seconds, 2),
           "tokens_per_s": round(result.tokens / seconds), "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
           "model_gib": round(loaded / 2**30, 2), "attn": runtime.attn_implementation,
           "checkpointing": runtime.gradient_checkpointing,
           "rope": (getattr(model.config, "rope_parameters", None) or {}).get("rope_type", "default")}  # fmt: skip
    del model, result
    return out


def check_losses(models) -> dict:
    if not torch.cuda.is_available():
        return {"status": "skipped", "reason": "CUDA not available (a 0.5B policy step is GPU work)"}
    from services.trainer.bench import BenchOptions, make_samples
    from services.trainer.model import load_tokenizer
    from shared.schemas import WeightedSample

    path = _qwen2_0p5b(models)
    opts = BenchOptions(samples=32, min_tokens=256, max_tokens=2048)
    samples = [WeightedSample(**row) for row in make_samples(load_tokenizer(path), opts)]
    runs = {loss: _epoch(path, samples, loss, micro_batch_tokens=16384) for loss in ("grace_kto", "kto", "dpo", "grpo")}
    runs["grace_kto_nf4"] = _epoch(path, samples, "grace_kto", micro_batch_tokens=16384, quantization="nf4")
    runs["grace_kto_sdpa"] = _epoch(path, samples, "grace_kto", micro_batch_tokens=16384, attn_implementation="sdpa")
    grace = runs["grace_kto"]
    return {"status": "ok", "model": "Qwen2-0.5B shape, random bf16", "samples": len(samples),
            "response_tokens": [opts.min_tokens, opts.max_tokens], "runs": runs,
            "grpo_speedup": round(runs["grpo"]["seconds"] / grace["seconds"], 3),
            "grpo_memory_ratio": round(grace["peak_gib"] / runs["grpo"]["peak_gib"], 3),
            "dpo_memory_ratio": round(grace["peak_gib"] / runs["dpo"]["peak_gib"], 3),
            "nf4_memory_ratio": round(runs["grace_kto_nf4"]["peak_gib"] / grace["peak_gib"], 3)}  # fmt: skip


def check_long_context(models) -> dict:
    if not torch.cuda.is_available():
        return {"status": "skipped", "reason": "CUDA not available (a 32k-token step is GPU work)"}
    from services.trainer.model import load_tokenizer
    from shared.schemas import WeightedSample

    path = _qwen2_0p5b(models)
    tokenizer = load_tokenizer(path)
    corpus = (ROOT / "data" / "sft.jsonl").read_text(encoding="utf-8")
    ids = tokenizer(corpus, add_special_tokens=False)["input_ids"]
    target = 32000
    body = tokenizer.decode((ids * (target // len(ids) + 1))[:target], skip_special_tokens=True)
    samples = [WeightedSample(run_id="gpu-check", iteration=0, sample_id=f"long:{i}", group_id="long", response_index=i,
                              query="Write the full report.", response=f"<summary>s</summary><outline>o</outline><answer>{body}</answer>",
                              weight=w, label="desirable" if w >= 0 else "undesirable", parsed=True)
               for i, w in enumerate((1.0, -1.0))]  # fmt: skip
    run = _epoch(path, samples, "grace_kto", batch_size=2, max_length=32768, micro_batch_tokens=32768,
                 yarn_factor=4.0, native_window=8192, rope_scope="inference_and_training", gradient_checkpointing="on")  # fmt: skip
    return {"status": "ok", "model": "Qwen2-0.5B shape, random bf16", "yarn": "factor 4 x 8192 native",
            "tokens_per_sample": run["tokens"] // 2, **run}  # fmt: skip


def check_attention(models) -> dict:
    """Which SDPA kernel the trainer's policy reaches on CUDA: the arguments of its first attention call,
    then one forward+backward of an 8k-token sequence with each backend allowed alone, under transformers'
    ``sdpa`` and under the trainer's default without flash-attn, ``grace_fused_sdpa``."""
    if not torch.cuda.is_available():
        return {"status": "skipped", "reason": "CUDA not available"}
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from services.trainer.config import TrainerSettings
    from services.trainer.model import FUSED_SDPA, Sequence, load_policy, sequence_logps

    path = _qwen2_0p5b(models)
    sequences = [Sequence(ids=[10 + i % 3000 for i in range(8192)], prompt_len=16)]
    original = F.scaled_dot_product_attention
    results: dict[str, dict] = {}
    for attn in ("sdpa", FUSED_SDPA):
        settings = TrainerSettings(policy_model=str(path), lora_rank=64, lora_alpha=128, precision="bf16",
                                   attn_implementation=attn, num_threads=None)  # fmt: skip
        model, tokenizer, runtime = load_policy(settings)
        seen: list[dict] = []

        def recording(q, k, v, *args, seen=seen, **kwargs):
            if not seen:
                seen.append({"q": [str(q.dtype), list(q.shape)], "k": [str(k.dtype), list(k.shape)], "v": str(v.dtype),
                             "mask": kwargs.get("attn_mask") is not None, "enable_gqa": kwargs.get("enable_gqa", False)})  # fmt: skip
            return original(q, k, v, *args, **kwargs)

        results[attn] = {"first_call": seen}
        for name, backends in (("any", [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                        SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]),
                               ("flash", [SDPBackend.FLASH_ATTENTION]), ("efficient", [SDPBackend.EFFICIENT_ATTENTION]),
                               ("cudnn", [SDPBackend.CUDNN_ATTENTION]), ("math", [SDPBackend.MATH])):  # fmt: skip
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            F.scaled_dot_product_attention = recording
            try:
                with sdpa_kernel(backends):
                    torch.cuda.synchronize()
                    started = time.perf_counter()
                    sequence_logps(model, sequences, tokenizer.pad_token_id or 0, runtime).sum().backward()
                    torch.cuda.synchronize()
                results[attn][name] = {"seconds": round(time.perf_counter() - started, 3),
                                       "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - the reason a backend cannot run is the finding
                results[attn][name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            finally:
                F.scaled_dot_product_attention = original
            model.zero_grad(set_to_none=True)
        del model
    fused = results[FUSED_SDPA]["any"]
    return {"status": "ok" if "error" not in fused else "failed", "tokens": 8192, "runs": results}


def check_profile(models) -> dict:
    """Where a GRACE-KTO epoch on the 0.5B-shaped policy spends its time: torch.profiler's top operators by
    CUDA time and by CPU time (the second epoch; the first warms up)."""
    if not torch.cuda.is_available():
        return {"status": "skipped", "reason": "CUDA not available"}
    from torch.profiler import ProfilerActivity, profile

    from services.trainer.bench import BenchOptions, make_samples
    from services.trainer.config import TrainerSettings
    from services.trainer.model import load_policy, load_tokenizer
    from services.trainer.train import Trainer
    from shared.schemas import WeightedSample

    path = _qwen2_0p5b(models)
    samples = [
        WeightedSample(**row)
        for row in make_samples(load_tokenizer(path), BenchOptions(samples=16, min_tokens=256, max_tokens=2048))
    ]
    # quantization "auto": QLoRA nf4 on CUDA with bitsandbytes, the trainer's default there
    settings = TrainerSettings(policy_model=str(path), lora_rank=64, lora_alpha=128, batch_size=8, precision="bf16",
                               micro_batch_tokens=16384, num_threads=None)  # fmt: skip
    model, tokenizer, runtime = load_policy(settings)
    Trainer(model, tokenizer, settings, runtime).train(samples)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        started = time.perf_counter()
        result = Trainer(model, tokenizer, settings, runtime).train(samples)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    table = prof.key_averages()
    cuda_total = sum(e.self_device_time_total for e in table) / 1e6
    return {"status": "ok", "tokens": result.tokens, "seconds": round(seconds, 2), "cuda_busy_s": round(cuda_total, 2),
            "by_cuda": table.table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=50),
            "by_cpu": table.table(sort_by="cpu_time_total", row_limit=20, max_name_column_width=50)}  # fmt: skip


def check_reward(models) -> dict:
    from services.reward.config import RewardSettings
    from services.reward.scorer import Scorer

    rows = [json.loads(line) for line in (ROOT / "data" / "sft.jsonl").read_text(encoding="utf-8").splitlines()][:6]
    groups = [(rows[0]["query"], [r["response"] for r in rows[:3]]), (rows[3]["query"], [r["response"] for r in rows[3:]])]
    paths = {"policy_model": str(models.policy), "general_model": str(models.general), "domain_model": str(models.domain),
             "embedding_model": str(models.embedding)}  # fmt: skip
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reference = Scorer(RewardSettings(**paths, device="cpu", dtype="fp32", worker=False)).score(groups)
    started = time.perf_counter()
    test = Scorer(RewardSettings(**paths, device=device, dtype="bf16", worker=False)).score(groups)
    seconds = time.perf_counter() - started
    worst: dict[str, float] = {}
    for ref_group, test_group in zip(reference, test):
        for a, b in zip(ref_group, test_group):
            assert (a is None) == (b is None), "bf16 and fp32 disagree on whether a response parses"
            if a is None:
                continue
            for name, tol in TOLERANCE.items():
                x, y = getattr(a, name), getattr(b, name)
                error = abs(x - y) / abs(x) if name.endswith("perplexity") and x else abs(x - y)
                worst[name] = max(worst.get(name, 0.0), error)
    failed = {k: v for k, v in worst.items() if v > TOLERANCE[k]}
    return {"status": "failed" if failed else "ok", "device": f"{device} bf16 vs cpu fp32", "worst_error": worst,
            "tolerance": TOLERANCE, "failed": failed, "seconds": round(seconds, 2)}  # fmt: skip


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for gpu-check.json")
    parser.add_argument("--checks", default="qlora_nf4,deepspeed_zero2,reward_bf16,attention,long_context,losses_0p5b,profile")
    args = parser.parse_args()
    from shared.tiny_models import ensure_model_set

    models = ensure_model_set("tiny")
    report: dict = {
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "packages": {p: _version(p) for p in ("transformers", "peft", "bitsandbytes", "deepspeed", "flash_attn")},
        "checks": {},
    }  # fmt: skip
    checks = {"qlora_nf4": check_qlora, "deepspeed_zero2": check_zero2, "reward_bf16": check_reward,
              "losses_0p5b": check_losses, "long_context": check_long_context, "attention": check_attention,
              "profile": check_profile}  # fmt: skip
    for name in args.checks.split(","):
        started = time.perf_counter()
        try:
            report["checks"][name] = checks[name](models)
        except Exception as exc:  # noqa: BLE001 - a failed check is reported, the next one still runs
            report["checks"][name] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                                      "traceback": traceback.format_exc()[-2000:]}  # fmt: skip
        report["checks"][name]["wall_s"] = round(time.perf_counter() - started, 2)
        print(f"{name}: {report['checks'][name]['status']}", flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu-check.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report))
    return 1 if any(c["status"] == "failed" for c in report["checks"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
