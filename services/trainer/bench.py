"""`grace bench trainer`: one GRACE-KTO epoch vs TRL's KTOTrainer, and vs DPO and GRPO, in the same run.

Every method runs in a fresh subprocess (so ``ru_maxrss`` is its own peak) on
the same model, data, batch size, sequence lengths, precision and LoRA
settings; the child imports the same libraries (trl, datasets, peft) before
measuring, so baselines start equal. Data: groups of 8 responses to one
query with long answers of varied length (uniform in [min, max] tokens), as
the workload has, and random calibrated-like weights.

- speed: prompt+response tokens of the epoch / wall seconds of the epoch
  (GRACE-KTO's time includes its tokenization and its reference pass; TRL's
  time is ``trainer.train()`` only, its tokenization excluded). The machines
  here are shared, so GRACE-KTO and TRL runs alternate ``repeats`` times and
  the fastest run of each counts;
- memory: peak RSS of the process (``resource.getrusage``), and the peak
  minus the RSS just before training (the largest over the repeats).
  GRACE-KTO and DPO use the same engine and token budget per forward
  (``micro_batch_tokens``, about one long sequence): a KTO step can run one
  sequence at a time, a DPO pair cannot be split (paper 4.1). GRPO (same engine and
  budget, per-token ratio; z = the sample's weight) runs once, like DPO.

Last output line: one JSON object with ``speedup_vs_trl``,
``memory_ratio_vs_trl`` (GRACE / TRL peak RSS) and ``dpo_memory_ratio``
(GRACE-KTO / DPO peak RSS, same engine and token budget), ``grpo_memory_ratio`` and
``grpo_speedup`` (GRACE-KTO / GRPO peak RSS; GRPO / GRACE-KTO epoch seconds).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from shared.bench_report import write_json, write_markdown
from shared.cli_options import opt

log = logging.getLogger(__name__)

METHODS = ("grace_kto", "trl_kto", "dpo", "grpo")
ONCE = ("dpo", "grpo")  # memory and tokens/s, one run each


@dataclass
class BenchOptions:
    preset: str = opt("small", "local model preset: small (tens of M params) or tiny")
    samples: int = opt(32, "weighted samples in the epoch (groups of 8)")
    batch_size: int = opt(8, "samples per optimizer step (paper: 8)")
    min_tokens: int = opt(64, "shortest response, in tokens")
    max_tokens: int = opt(640, "longest response, in tokens")
    precision: str = opt("fp32", "fp32 or bf16 (the same for every method)")
    lora_rank: int = opt(64, "LoRA rank (paper: 64)")
    threads: int = opt(0, "torch threads per method (0 = torch default)")
    micro_batch_tokens: int = opt(1024, "GRACE-KTO/DPO padded tokens per forward (about one long sequence)")
    repeats: int = opt(2, "alternating GRACE-KTO/TRL runs; the fastest of each counts (shared machines)")
    seed: int = opt(0, cli=False)
    out: Path | None = opt(None, "folder for bench.json and the table (default: <run_root>/bench-trainer)")


# --------------------------------------------------------------------------- data


def make_samples(tokenizer: Any, opts: BenchOptions) -> list[dict[str, Any]]:
    """Groups of 8 tagged responses with answers of varied token length, cut from the project's corpora."""
    from shared.jsonl import read_queries
    from shared.tiny_models import DATA_DIR

    rng = random.Random(opts.seed)
    corpus = "\n".join(p.read_text(encoding="utf-8") for p in sorted(DATA_DIR.glob("*corpus*.txt"))) or "report " * 5000
    ids = tokenizer(corpus, add_special_tokens=False)["input_ids"]
    queries = [row["query"] for row in read_queries(DATA_DIR / "seed_queries.jsonl")]

    def text(n: int) -> str:
        start = rng.randrange(0, max(len(ids) - n, 1))
        return tokenizer.decode(ids[start : start + n], skip_special_tokens=True)

    samples = []
    for i in range(opts.samples):
        group, index = divmod(i, 8)
        weight = round(rng.gauss(0.0, 1.0), 4)
        response = f"<summary>{text(24)}</summary><outline>{text(24)}</outline><answer>{text(rng.randint(opts.min_tokens, opts.max_tokens))}</answer>"
        samples.append({
            "run_id": "bench", "iteration": 0, "sample_id": f"bench:0:{group}:{index}", "group_id": f"bench:0:{group}",
            "response_index": index, "query": queries[group % len(queries)], "response": response, "weight": weight,
            "label": "desirable" if weight >= 0 else "undesirable", "parsed": True, "z": weight,
        })  # fmt: skip
    return samples


# --------------------------------------------------------------------------- child: one method


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_method(method: str, policy: str, data: Path, opts: BenchOptions) -> dict[str, Any]:
    import datasets  # noqa: F401  (same imports in every child: equal baselines)
    import peft  # noqa: F401
    import torch
    import trl  # noqa: F401

    from services.trainer.config import TrainerSettings
    from services.trainer.losses import class_weights
    from services.trainer.model import load_base, load_tokenizer, lora_config, resolve_runtime
    from shared.schemas import WeightedSample

    if opts.threads:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    settings = TrainerSettings(
        policy_model=policy, lora_rank=opts.lora_rank, lora_alpha=2 * opts.lora_rank, batch_size=opts.batch_size,
        precision=opts.precision, micro_batch_tokens=opts.micro_batch_tokens, max_length=opts.max_tokens + 512,
        seed=opts.seed, num_threads=opts.threads or None,
    )  # fmt: skip
    samples = [WeightedSample(**row) for row in json.loads(data.read_text())]
    runtime = resolve_runtime(settings)
    tokenizer = load_tokenizer(policy)
    base = load_base(policy, runtime, settings.rope())

    if method == "trl_kto":
        from datasets import Dataset
        from trl import KTOConfig, KTOTrainer

        from shared.prompts import chat_messages

        n_pos = sum(s.weight >= 0 for s in samples)
        lam = class_weights(n_pos, len(samples) - n_pos)
        rows = [{"prompt": chat_messages(s.query), "completion": [{"role": "assistant", "content": s.response}],
                 "label": s.weight >= 0} for s in samples]  # fmt: skip
        args = KTOConfig(
            output_dir=tempfile.mkdtemp(prefix="bench-trl-"), per_device_train_batch_size=opts.batch_size,
            num_train_epochs=1, learning_rate=settings.learning_rate, lr_scheduler_type="cosine_with_min_lr",
            lr_scheduler_kwargs={"min_lr": settings.min_learning_rate}, warmup_steps=settings.warmup_ratio,
            beta=settings.beta, desirable_weight=lam[0], undesirable_weight=lam[1], max_length=settings.max_length,
            report_to="none", use_cpu=True, save_strategy="no", logging_steps=10**6, disable_dropout=True,
            bf16=opts.precision == "bf16", dataloader_num_workers=0, seed=opts.seed, max_grad_norm=settings.max_grad_norm,
        )  # fmt: skip
        trainer = KTOTrainer(model=base, args=args, processing_class=tokenizer, train_dataset=Dataset.from_list(rows),
                             peft_config=lora_config(settings))  # fmt: skip
        tokens = int(sum(len(r["prompt_ids"]) + len(r["completion_ids"]) for r in trainer.train_dataset))
        rss_before = _rss_mb()
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
        steps = trainer.state.global_step
    else:
        from peft import get_peft_model

        from services.trainer.train import Trainer

        model = get_peft_model(base, lora_config(settings))
        trainer = Trainer(model, tokenizer, settings, runtime, loss=method)
        rss_before = _rss_mb()
        started = time.perf_counter()
        result = trainer.train(samples, iteration=0)
        seconds = time.perf_counter() - started
        tokens, steps = result.tokens, result.steps
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "method": method, "steps": steps, "tokens": tokens, "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1), "rss_before_mb": round(rss_before, 1),
        "peak_rss_mb": round(_peak_mb(), 1), "peak_delta_mb": round(_peak_mb() - rss_before, 1),
        "process_cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
    }  # fmt: skip


# --------------------------------------------------------------------------- parent


def run_bench(opts: BenchOptions) -> dict[str, Any]:
    from services.trainer.config import TrainerSettings
    from services.trainer.model import load_tokenizer
    from shared.tiny_models import ensure_model_set

    models = ensure_model_set(opts.preset)
    out = opts.out or TrainerSettings().run_root / "bench-trainer"
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(models.policy)
    data = out / "bench_samples.json"
    data.write_text(json.dumps(make_samples(tokenizer, opts)))
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
    order = [m for r in range(opts.repeats) for m in METHODS if m not in ONCE or r == 0]  # DPO, GRPO: once
    for method in order:
        command = [sys.executable, "-m", "services.trainer.bench", "--method", method, "--policy", str(models.policy),
                   "--data", str(data), "--options", json.dumps({k: v for k, v in asdict(opts).items() if k != "out"})]  # fmt: skip
        print(f"running {method} (run {len(runs[method]) + 1}) ...", flush=True)
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{method} failed:\n{proc.stderr[-4000:]}")
        runs[method].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"  {runs[method][-1]['seconds']} s, peak RSS {runs[method][-1]['peak_rss_mb']} MB", flush=True)
    results = {}
    for method, done in runs.items():  # the fastest run's figures, the largest peak memory
        best = dict(min(done, key=lambda r: r["seconds"]))
        best["peak_rss_mb"] = max(r["peak_rss_mb"] for r in done)
        best["peak_delta_mb"] = max(r["peak_delta_mb"] for r in done)
        best["runs_seconds"] = [r["seconds"] for r in done]
        results[method] = best
    grace, trl_kto, dpo, grpo = (results[m] for m in METHODS)
    summary = {
        "preset": opts.preset, "samples": opts.samples, "batch_size": opts.batch_size, "precision": opts.precision,
        "lora_rank": opts.lora_rank, "response_tokens": [opts.min_tokens, opts.max_tokens],
        "micro_batch_tokens": opts.micro_batch_tokens, "repeats": opts.repeats, "methods": results,
        "speedup_vs_trl": round(trl_kto["seconds"] / grace["seconds"], 3),  # the same epoch's wall time
        "memory_ratio_vs_trl": round(grace["peak_rss_mb"] / trl_kto["peak_rss_mb"], 3),
        "memory_delta_ratio_vs_trl": round(grace["peak_delta_mb"] / max(trl_kto["peak_delta_mb"], 1e-9), 3),
        "dpo_memory_ratio": round(grace["peak_rss_mb"] / dpo["peak_rss_mb"], 3),
        "dpo_memory_delta_ratio": round(grace["peak_delta_mb"] / max(dpo["peak_delta_mb"], 1e-9), 3),
        "grpo_memory_ratio": round(grace["peak_rss_mb"] / grpo["peak_rss_mb"], 3),
        "grpo_speedup": round(grpo["seconds"] / grace["seconds"], 3),  # > 1: GRACE-KTO's epoch is faster
    }  # fmt: skip
    write_json(out / "bench.json", summary, indent=1)
    header = ["method", "steps", "tokens", "seconds", "tokens/s", "peak RSS MB", "peak - start MB"]
    rows = [[r[k] for k in ("method", "steps", "tokens", "seconds", "tokens_per_s", "peak_rss_mb", "peak_delta_mb")]
            for r in results.values()]  # fmt: skip
    print(write_markdown(out / "bench.md", header, rows))
    print(json.dumps(summary), flush=True)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description="one benchmark method in a fresh process (used by `grace bench trainer`)")
    parser.add_argument("--method", choices=METHODS, required=True)
    parser.add_argument("--policy", required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--options", required=True)
    args = parser.parse_args()
    logging.basicConfig(level="WARNING")
    opts = BenchOptions(**json.loads(args.options))
    print(json.dumps(run_method(args.method, args.policy, args.data, opts)), flush=True)


if __name__ == "__main__":
    main()
