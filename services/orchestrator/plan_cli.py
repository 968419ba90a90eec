"""`grace plan`: size a GPU node before renting it (the arithmetic lives in services/orchestrator/plan.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import typer

from shared.cli_options import from_options, opt


def _split(value: str | None) -> tuple[int, int, int] | None:
    if not value:
        return None
    try:
        r, w, t = (int(x) for x in value.split(","))
    except ValueError:
        raise ValueError("ROLLOUT,REWARD,TRAINER, e.g. 2,2,4") from None
    return r, w, t


@dataclass
class PlanOptions:
    policy: str = opt("qwen2.5-7b", "policy: a config.json folder, a preset (qwen2.5-7b, qwen2.5-1.5b, qwen2.5-0.5b, "
                      "llama-3.1-8b) or tiny/small (the local model set)")  # fmt: skip
    general: str | None = opt(None, "M_G (default: the policy's spec)")
    domain: str | None = opt(None, "M_D (default: the policy's spec)")
    encoder: str | None = opt(None, "BGE-M3-format encoder (default: bge-m3, or the local set's)")
    k: int = opt(250, "K queries per iteration (paper: 250 or 500)", "-k", "--queries", min=1)
    m: int = opt(8, "m responses per query (paper: 8)", "-m", "--responses", min=1)
    total_queries: int = opt(1000, "query budget N: ceil(N/K) iterations", "--total-queries", "-n", min=1)
    prompt_tokens: int = opt(400, "mean prompt: system prompt + query", min=1)
    doc_tokens: int = opt(5400, "mean document (<answer>) tokens", min=1)
    summary_tokens: int = opt(300, "mean <summary> + <outline> tokens around the document", min=0)
    lora_rank: int = opt(64, "LoRA rank r (paper: 64)", min=1)
    qlora: bool = opt(True, "4-bit nf4 base weights in the trainer (paper: yes)")
    gradient_checkpointing: bool = opt(True, "gradient checkpointing", "--checkpointing/--no-checkpointing")
    epochs: int = opt(1, "epochs per iteration", min=1)
    eval_queries: int = opt(8, "held-out queries evaluated per iteration", min=0)
    gpu: str = opt("h200", "h200 | h100 | a100 | l40s | cpu (this machine, measured now)")
    gpus: int = opt(8, "GPUs on the node, split among rollout / reward / trainer", min=1)
    split: tuple[int, int, int] | None = opt(None, "fixed split ROLLOUT,REWARD,TRAINER (default: the fastest)", cli_type=str,
                                             parse=_split)  # fmt: skip
    peak_tflops: float | None = opt(None, "custom device: dense bf16 TFLOP/s")
    bandwidth_gbs: float | None = opt(None, "custom device: memory bandwidth, GB/s")
    memory_gb: float | None = opt(None, "custom device: memory per GPU, GB")
    measure_cpu: bool = opt(False, "measure this CPU (matmul FLOP/s, copy bandwidth) and plan on it", "--measure-cpu")
    demo: bool = opt(False, "the setting of `grace demo` (tiny set, K=16, m=8, 3 iterations) on this CPU", "--demo")
    compare: Path | None = opt(None, "a run folder (or its metrics.jsonl): measured / predicted iteration time")
    out: Path | None = opt(None, "also write the Markdown table here")


# the options that are PlanInputs fields of the same name
SETTINGS = ("k", "m", "total_queries", "prompt_tokens", "doc_tokens", "summary_tokens", "lora_rank", "qlora",
            "gradient_checkpointing", "epochs", "eval_queries", "gpus")  # fmt: skip


@from_options(PlanOptions)
def plan(options: PlanOptions) -> None:
    """Capacity plan per iteration: stage times, memory per service, the best GPU split. Last line: JSON."""
    from services.orchestrator import plan as P

    o = options
    policy, measure_cpu = ("tiny", True) if o.demo else (o.policy, o.measure_cpu)
    tiny = policy.lower() in ("tiny", "small")
    device_name = "cpu" if measure_cpu else o.gpu.lower()
    measured: dict | None = None
    if device_name == "cpu":
        from services.orchestrator.measure import cpu_device

        shape_for = P.load_shape(policy, "policy")
        # matmuls at the policy's own shape (a batch of tokens through its MLP), capped to keep this to seconds
        tokens = 2048 if shape_for.hidden < 1024 else 512
        device, measured = cpu_device(shape=(tokens, min(shape_for.hidden, 4096), min(shape_for.intermediate, 4096)))
    elif device_name in P.DEVICES:
        device = P.DEVICES[device_name]
    else:
        raise typer.BadParameter(f"choose from {', '.join(P.DEVICES)}, cpu", param_hint="--gpu")
    custom = {"peak_flops": o.peak_tflops and o.peak_tflops * 1e12, "bandwidth": o.bandwidth_gbs and o.bandwidth_gbs * 1e9,
              "memory": o.memory_gb and o.memory_gb * 1e9}  # fmt: skip
    custom = {key: value for key, value in custom.items() if value}
    if custom:
        device = replace(device, name=f"custom ({device.name} + {', '.join(custom)})", **custom)
    try:
        shapes = {
            "policy": P.load_shape(policy, "policy"),
            "general": P.load_shape(o.general or policy, "general"),
            "domain": P.load_shape(o.domain or policy, "domain"),
            "encoder": P.load_shape(o.encoder or (policy if tiny else "bge-m3"), "encoder"),
        }
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    settings = {name: getattr(o, name) for name in SETTINGS}
    if o.demo:
        settings.update(P.DEMO_SETTINGS)
    if device.kind == "cpu":
        from services.orchestrator.measure import CPU_KV_CACHE_BYTES

        settings.update(gpus=1, qlora=False, gradient_checkpointing=False, kv_cache_bytes=CPU_KV_CACHE_BYTES)
    inputs = P.PlanInputs(device=device, **shapes, **settings)
    result = P.make_plan(inputs, o.split)
    text = P.markdown(result)
    if measured:
        text += (f"\n- measured here: matmul {measured['matmul_bf16_gflop_s']:.1f} GFLOP/s bf16, "
                 f"{measured['matmul_fp32_gflop_s']:.1f} fp32 at {tuple(measured['shape'])}; copy "
                 f"{measured['copy_gb_s']:.1f} GB/s; {measured['threads']:.0f} threads.")  # fmt: skip
    summary = result.summary()
    if measured:
        summary["measured"] = measured
    if o.compare is not None:
        path = o.compare / "metrics.jsonl" if o.compare.is_dir() else o.compare
        rows = P.measured_stage_seconds(path)
        predicted = result.iteration_s
        summary["compare"] = {"predicted_iteration_s": round(predicted, 2), "measured": rows,
                              "ratio_measured_over_predicted": [round(r["seconds"] / predicted, 2) for r in rows]}  # fmt: skip
        text += "\n\n| iteration | measured | predicted | measured / predicted |\n|---|---|---|---|\n" + "\n".join(
            f"| {r['iteration']} | {r['seconds']:.1f} s | {predicted:.1f} s | {r['seconds'] / predicted:.2f} |" for r in rows
        )
    if o.out:
        o.out.parent.mkdir(parents=True, exist_ok=True)
        o.out.write_text(text + "\n")
    typer.echo(text)
    typer.echo(json.dumps(summary, separators=(",", ":")))
