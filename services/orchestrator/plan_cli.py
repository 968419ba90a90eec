"""`grace plan`: size a GPU node before renting it (the arithmetic lives in services/orchestrator/plan.py)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer


def _split(value: str | None) -> tuple[int, int, int] | None:
    if not value:
        return None
    try:
        r, w, t = (int(x) for x in value.split(","))
    except ValueError as exc:
        raise typer.BadParameter("ROLLOUT,REWARD,TRAINER, e.g. 2,2,4", param_hint="--split") from exc
    return r, w, t


def plan(
    policy: str = typer.Option(
        "qwen2.5-7b",
        help="policy: a config.json folder, a preset (qwen2.5-7b, qwen2.5-1.5b, "
        "qwen2.5-0.5b, llama-3.1-8b) or tiny/small (the local model set)",
    ),
    general: Optional[str] = typer.Option(None, help="M_G (default: the policy's spec)"),
    domain: Optional[str] = typer.Option(None, help="M_D (default: the policy's spec)"),
    encoder: Optional[str] = typer.Option(None, help="BGE-M3-format encoder (default: bge-m3, or the local set's)"),
    k: int = typer.Option(250, "-k", "--queries", min=1, help="K queries per iteration (paper: 250 or 500)"),
    m: int = typer.Option(8, "-m", "--responses", min=1, help="m responses per query (paper: 8)"),
    total_queries: int = typer.Option(1000, "--total-queries", "-n", min=1, help="query budget N: ceil(N/K) iterations"),
    prompt_tokens: int = typer.Option(400, min=1, help="mean prompt: system prompt + query"),
    doc_tokens: int = typer.Option(5400, min=1, help="mean document (<answer>) tokens"),
    summary_tokens: int = typer.Option(300, min=0, help="mean <summary> + <outline> tokens around the document"),
    lora_rank: int = typer.Option(64, min=1, help="LoRA rank r (paper: 64)"),
    qlora: bool = typer.Option(True, "--qlora/--no-qlora", help="4-bit nf4 base weights in the trainer (paper: yes)"),
    checkpointing: bool = typer.Option(True, "--checkpointing/--no-checkpointing", help="gradient checkpointing"),
    epochs: int = typer.Option(1, min=1, help="epochs per iteration"),
    eval_queries: int = typer.Option(8, min=0, help="held-out queries evaluated per iteration"),
    gpu: str = typer.Option("h200", help="h200 | h100 | a100 | l40s | cpu (this machine, measured now)"),
    gpus: int = typer.Option(8, min=1, help="GPUs on the node, split among rollout / reward / trainer"),
    split: Optional[str] = typer.Option(None, help="fixed split ROLLOUT,REWARD,TRAINER (default: the fastest)"),
    peak_tflops: Optional[float] = typer.Option(None, help="custom device: dense bf16 TFLOP/s"),
    bandwidth_gbs: Optional[float] = typer.Option(None, help="custom device: memory bandwidth, GB/s"),
    memory_gb: Optional[float] = typer.Option(None, help="custom device: memory per GPU, GB"),
    measure_cpu: bool = typer.Option(
        False, "--measure-cpu", help="measure this CPU (matmul FLOP/s, copy bandwidth) and plan on it"
    ),
    demo: bool = typer.Option(False, "--demo", help="the setting of `grace demo` (tiny set, K=8, m=8, 3 iterations) on this CPU"),
    compare: Optional[Path] = typer.Option(None, help="a run folder (or its metrics.jsonl): measured / predicted iteration time"),
    out: Optional[Path] = typer.Option(None, help="also write the Markdown table here"),
) -> None:
    """Capacity plan per iteration: stage times, memory per service, the best GPU split. Last line: JSON."""
    from services.orchestrator import plan as P

    if demo:
        policy, measure_cpu = "tiny", True
    tiny = policy.lower() in ("tiny", "small")
    device_name = "cpu" if measure_cpu else gpu.lower()
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
    custom = {"peak_flops": peak_tflops and peak_tflops * 1e12, "bandwidth": bandwidth_gbs and bandwidth_gbs * 1e9,
              "memory": memory_gb and memory_gb * 1e9}  # fmt: skip
    custom = {key: value for key, value in custom.items() if value}
    if custom:
        device = replace(device, name=f"custom ({device.name} + {', '.join(custom)})", **custom)
    try:
        shapes = {
            "policy": P.load_shape(policy, "policy"),
            "general": P.load_shape(general or policy, "general"),
            "domain": P.load_shape(domain or policy, "domain"),
            "encoder": P.load_shape(encoder or (policy if tiny else "bge-m3"), "encoder"),
        }
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    settings = {"k": k, "m": m, "total_queries": total_queries, "prompt_tokens": prompt_tokens, "doc_tokens": doc_tokens,
                "summary_tokens": summary_tokens, "lora_rank": lora_rank, "qlora": qlora,
                "gradient_checkpointing": checkpointing, "epochs": epochs, "eval_queries": eval_queries, "gpus": gpus}  # fmt: skip
    if demo:
        settings.update(P.DEMO_SETTINGS)
    if device.kind == "cpu":
        from services.orchestrator.measure import CPU_KV_CACHE_BYTES

        settings.update(gpus=1, qlora=False, gradient_checkpointing=False, kv_cache_bytes=CPU_KV_CACHE_BYTES)
    inputs = P.PlanInputs(device=device, **shapes, **settings)
    result = P.make_plan(inputs, _split(split))
    text = P.markdown(result)
    if measured:
        text += (f"\n- measured here: matmul {measured['matmul_bf16_gflop_s']:.1f} GFLOP/s bf16, "
                 f"{measured['matmul_fp32_gflop_s']:.1f} fp32 at {tuple(measured['shape'])}; copy "
                 f"{measured['copy_gb_s']:.1f} GB/s; {measured['threads']:.0f} threads.")  # fmt: skip
    summary = result.summary()
    if measured:
        summary["measured"] = measured
    if compare is not None:
        path = compare / "metrics.jsonl" if compare.is_dir() else compare
        rows = P.measured_stage_seconds(path)
        predicted = result.iteration_s
        summary["compare"] = {"predicted_iteration_s": round(predicted, 2), "measured": rows,
                              "ratio_measured_over_predicted": [round(r["seconds"] / predicted, 2) for r in rows]}  # fmt: skip
        text += "\n\n| iteration | measured | predicted | measured / predicted |\n|---|---|---|---|\n" + "\n".join(
            f"| {r['iteration']} | {r['seconds']:.1f} s | {predicted:.1f} s | {r['seconds'] / predicted:.2f} |" for r in rows
        )
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    typer.echo(text)
    typer.echo(json.dumps(summary, separators=(",", ":")))
