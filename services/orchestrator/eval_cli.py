"""`grace eval`, `grace eval context`: the paper's tables, z-score plots and the context study
(heavy imports stay inside the functions)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal, Optional

import typer

eval_app = typer.Typer(help="Evaluation: the paper's tables and z-score plots.")


def _default_out(prefix: str) -> Path:
    from services.judge.config import JudgeSettings

    settings = JudgeSettings()
    return settings.run_root / settings.run_id / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


@eval_app.callback(invoke_without_command=True)
def evaluate(
    ctx: typer.Context,
    policy: list[str] = typer.Option(
        None, "--policy", "-p",
        help="repeatable: MODEL, LABEL=MODEL, or LABEL=MODEL@BASE_URL (e.g. -p Baseline=base -p 'GRACE (it 3)=v3')",
    ),
    queries: Path = typer.Option(Path("data/test_queries.jsonl"), help="held-out split (jsonl with 'query')"),
    limit: int = typer.Option(None, help="first N queries only"),
    out: Path = typer.Option(None, help="output folder (default: <run_root>/<run_id>/eval-<time>)"),
    rollout_url: str = typer.Option("http://127.0.0.1:8000/v1", envvar="GRACE_EVAL_ROLLOUT_URL", help="OpenAI base URL of the rollout service"),
    reward_url: str = typer.Option("http://127.0.0.1:8100", envvar="GRACE_EVAL_REWARD_URL", help="reward service (POST /v1/score); '' = skip"),
    judge_url: str = typer.Option(None, envvar="GRACE_EVAL_JUDGE_URL", help="judge service; unset = the GRACE_JUDGE_* backend directly"),
    judge: bool = typer.Option(True, help="run the LLM judge (Table 2)"),
    rollout_api_key: str = typer.Option(None, envvar=["GRACE_EVAL_ROLLOUT_API_KEY", "GRACE_API_KEY"], help="bearer key of the rollout service"),
    reward_api_key: str = typer.Option(None, envvar=["GRACE_EVAL_REWARD_API_KEY", "GRACE_API_KEY"], help="bearer key of the reward service"),
    judge_api_key: str = typer.Option(None, envvar=["GRACE_EVAL_JUDGE_API_KEY", "GRACE_API_KEY"], help="bearer key of the judge service"),
    n: int = typer.Option(1, help="responses per query and policy"),
    temperature: float = typer.Option(0.7),
    top_p: float = typer.Option(0.95),
    max_tokens: Optional[int] = typer.Option(
        None, help="largest response, in tokens (default: the served window minus the prompt, as in sampling)"
    ),
    seed: int = typer.Option(0, help="sampling seed (query i uses seed + i)"),
    concurrency: int = typer.Option(8, help="generation requests at once"),
    judge_part: str = typer.Option("answer", help="answer: judge the <answer> document when parsed; full: the whole text"),
    reference: bool = typer.Option(False, help="also evaluate the query file's 'response' field, unranked (Table 2's Labeled Answer)"),
    judge_reference: bool = typer.Option(False, help="give the judge the query file's 'response' field as a reference answer"),
    stages: bool = typer.Option(False, help="policies are training stages in order: figure 3 lines, not figure 1 bars"),
    reward_batch: int = typer.Option(4, help="groups per /v1/score request (keep within the reward service's max_groups)"),
    judge_batch: int = typer.Option(16, help="items per /v1/judge/batch request"),
) -> None:
    """Generate, score and judge the held-out split for each policy; write tables and a z-score plot."""
    if ctx.invoked_subcommand is not None:
        return
    if not policy:
        raise typer.BadParameter("give at least one --policy", param_hint="--policy")
    if judge_part not in ("answer", "full"):
        raise typer.BadParameter("answer or full", param_hint="--judge-part")
    from services.orchestrator.evaluation import EvalOptions, parse_policy_spec, run_eval

    try:
        specs = [parse_policy_spec(p) for p in policy]
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--policy") from exc
    opts = EvalOptions(
        policies=specs, queries=queries, limit=limit, out_dir=out or _default_out("eval"), rollout_url=rollout_url,
        reward_url=reward_url or None, judge_url=judge_url, judge=judge, rollout_api_key=rollout_api_key,
        reward_api_key=reward_api_key, judge_api_key=judge_api_key, n=n,
        temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed, concurrency=concurrency,
        judge_part=judge_part, reference=reference, judge_reference=judge_reference, stages=stages,
        reward_groups_per_request=reward_batch, judge_items_per_request=judge_batch,
    )  # fmt: skip
    run_eval(opts)
    for name in ("table_automatic.md", "table_judge.md"):
        path = opts.out_dir / name
        if path.exists():
            typer.echo(path.read_text())
    typer.echo(f"written to {opts.out_dir}")


@eval_app.command("context")
def context(
    model: str = typer.Option(None, help="causal LM folder (default: policy_model, else the local model_preset set)"),
    preset: Optional[Literal["tiny", "small"]] = typer.Option(None, help="local model set when no model is given (default: model_preset)"),
    out: Path = typer.Option(None, help="output folder (default: <run_root>/<run_id>/context-<time>)"),
    native_window: int = typer.Option(None, help="treat this as the native window N (default: the model's)"),
    factors: str = typer.Option("1,2,4", help="windows as multiples of N"),
    methods: str = typer.Option("extrapolation,dynamic,yarn", help="extension methods"),
    texts: int = typer.Option(2, help="long texts per window for perplexity"),
    prompts: int = typer.Option(2, help="test queries for the generated length"),
    max_new_tokens: int = typer.Option(None, help="cap on generated tokens (default: up to the window)"),
    queries: Path = typer.Option(Path("data/test_queries.jsonl"), help="prompts for generation"),
    device: str = typer.Option("auto"),
    dtype: str = typer.Option("auto", help="auto | bf16 | fp32"),
) -> None:
    """Table 3: perplexity and generated length at 1x/2x/4x the native window, per rope scaling method."""
    from services.judge.config import JudgeSettings
    from services.orchestrator.context import METHODS, ContextOptions, run_context

    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in method_list if m not in METHODS]
    if unknown:
        raise typer.BadParameter(f"unknown {unknown}; choose from {', '.join(METHODS)}", param_hint="--methods")
    try:
        factor_list = [float(f) for f in factors.split(",") if f.strip()]
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--factors") from exc
    if not model:
        model = JudgeSettings(**({"model_preset": preset} if preset else {})).policy_path()
    opts = ContextOptions(
        model=model, out_dir=out or _default_out("context"), native_window=native_window, factors=factor_list,
        methods=method_list, texts=texts, prompts=prompts, max_new_tokens=max_new_tokens, queries=queries,
        device=device, dtype=dtype,
    )  # fmt: skip
    run_context(opts)
    typer.echo((opts.out_dir / "context.md").read_text())
    typer.echo(f"written to {opts.out_dir}")
