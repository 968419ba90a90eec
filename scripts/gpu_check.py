"""The GPU code paths, run for real on a lent CUDA machine (``scripts/gpu-check.sh``); each check reports
what ran. On a machine without CUDA the CUDA-only checks say they were skipped, and the reward check
compares CPU bf16 with CPU fp32 instead, so the script itself is tested here (tests/deploy/test_gpu_check.py).

Checks:
- ``qlora_nf4``: one GRACE-KTO step on the tiny policy loaded in 4-bit nf4 (bitsandbytes), LoRA on top;
- ``deepspeed_zero2``: one GRACE-KTO step under DeepSpeed ZeRO-2 (one rank, the trainer's own config file);
- ``reward_bf16``: the reward metrics on CUDA in bf16 against CPU fp32 on the same responses, within
  ``TOLERANCE`` (L and E exact; perplexities relative; relevance absolute).

The last stdout line is the report as JSON; ``--out DIR`` also writes it to ``DIR/gpu-check.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
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
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        os.environ.setdefault(key, value)
    zero2 = ROOT / "services" / "trainer" / "deepspeed" / "zero2.json"
    return {"status": "ok", **_train_step(models, deepspeed=str(zero2), quantization="none", precision="bf16")}


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for gpu-check.json")
    parser.add_argument("--checks", default="qlora_nf4,deepspeed_zero2,reward_bf16")
    args = parser.parse_args()
    from shared.tiny_models import ensure_model_set

    models = ensure_model_set("tiny")
    report: dict = {
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "packages": {p: importlib.util.find_spec(p) is not None for p in ("bitsandbytes", "deepspeed", "flash_attn", "peft")},
        "checks": {},
    }  # fmt: skip
    checks = {"qlora_nf4": check_qlora, "deepspeed_zero2": check_zero2, "reward_bf16": check_reward}
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
