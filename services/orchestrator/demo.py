"""`grace demo`: the whole GRACE-KTO loop on the embedded default.

Tiny local models -> SFT until the tiny policy emits the tag format ->
local stack (private Redis, vLLM CPU build, reward, trainer, judge) ->
a short semi-online run -> the iteration table and the report path -> down.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from services.orchestrator.loop import RunOptions, SemiOnlineRun
from services.orchestrator.options import DemoOptions
from services.orchestrator.stack import LocalStack, StackConfig
from shared.rope import RopeConfig
from shared.runs import RunConfig

# The tiny world's training budget, measured with scripts/method_probe.py (8 seeds x 3 rounds per setting,
# 24 held-out queries x 4 samples; README "What moves the tiny world"): with K=8 and lr 1e-3 (16 optimizer
# steps a round) neither GRACE-KTO nor KTO moved the held-out rows (L 26.1 -> 26.3); K=16 with lr 3e-3 -> 3e-4
# raised L in 8 of 8 seeds (26.1 -> 44.1) and the average rank against the SFT policy in 8 of 8, kept the parse
# rate (0.77 -> 0.79), and is the budget where GRACE-KTO beat KTO (paired average rank -0.13, p = 0.008).
# No token cap: sampling and evaluation get the window minus the prompt, as in a real run (a cap would make the
# longest answers truncated negatives).
# The paper trains with native RoPE and applies YaRN in vLLM only (rope_scope
# "inference", the default for real models). A 0.8M-parameter policy trained
# natively does not tolerate YaRN frequencies it never saw: with that default the
# demo's SFT reached a 71% tag rate (96% before, trained under YaRN), held-out
# parse fell to 0.67-0.75 and rollout parse to 44% by iteration 1. So the tiny
# demo trains under the same YaRN it samples with.
DEMO_ROPE = RopeConfig(scope="inference_and_training")
DEMO_SERVICE_SETTINGS = {
    "rollout": {"dtype": "float32"},  # vLLM CPU would cast to bf16; the trainer trains fp32
    "trainer": {"lora_rank": 16, "lora_alpha": 32, "learning_rate": 3e-3, "min_learning_rate": 3e-4, "epochs": 2},
}


def sft_policy(work_dir: Path, console: Console, rope: RopeConfig) -> Path:
    """The SFT starting policy, built once per work folder (the marker is written last) by the trainer's
    `grace sft` in its own process; its last stdout line is the summary."""
    out = work_dir / "policy-sft"
    marker = out / ".grace-sft-done"
    if marker.exists():
        console.print(f"SFT policy: reusing {out}")
        return out
    command = [sys.executable, "-m", "shared.cli", "sft", "--out", str(out), "--rope", rope.model_dump_json()]
    env = {**os.environ, **{f"GRACE_TRAINER_{k.upper()}": str(v) for k, v in rope_settings(rope).items()}}
    with console.status("SFT: teaching the tiny policy the <summary>/<outline>/<answer> format and query generation"):
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"the SFT stage failed (exit {done.returncode}): {' '.join(command)}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    marker.write_text(str(result.get("final_loss")))
    rate = result["tag_rate"]
    measured = "" if rate is None else f", sampled tag rate {rate:.0%} on the seed queries"
    console.print(f"SFT policy: {out} ({result['steps']} steps in {len(result['rounds'])} round(s), kept round "
                  f"{result['kept_round']}, final loss {result['final_loss']:.3f}{measured})")  # fmt: skip
    if rate is not None and rate < result["target_tag_rate"]:
        console.print(f"[yellow]warning: the tag rate stayed under the target {result['target_tag_rate']:.0%}; "
                      "iterations will see more unparsed responses[/yellow]")  # fmt: skip
    return out


def rope_settings(rope: RopeConfig) -> dict[str, object]:
    """The common settings that give every service ``rope`` (unset native window = the model's)."""
    values = {"yarn_factor": rope.yarn_factor, "rope_scope": rope.scope}
    return values | ({"native_window": rope.native_window} if rope.native_window else {})


def tiny_stack_config(work_dir: Path, policy: Path, models, run_root: Path) -> StackConfig:
    """The demo's stack on the tiny model set (also `grace experiment`'s own stack): the SFT policy, the tiny
    general/domain/embedding models, adapters in ``work_dir/adapters``, run folders in ``run_root``."""
    return StackConfig(
        stack_dir=work_dir / "stack",
        common={
            "policy_model": str(policy),
            "general_model": str(models.general),
            "domain_model": str(models.domain),
            "embedding_model": str(models.embedding),
            "adapter_root": str(work_dir / "adapters"),
            "run_root": str(run_root),
            **rope_settings(DEMO_ROPE),
        },
        per_service=DEMO_SERVICE_SETTINGS,
    )


def run_demo(options: DemoOptions, console: Console | None = None) -> Path:
    from shared.tiny_models import ensure_model_set

    console = console or Console()
    started = time.perf_counter()
    work_dir = options.work_dir.resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    console.rule("1/4 tiny local models")
    models = ensure_model_set("tiny")
    console.print(f"models: {models.root}")
    console.rule("2/4 SFT stage")
    rope = DEMO_ROPE
    policy = sft_policy(work_dir, console, rope)
    console.rule("3/4 local stack")
    run_root = work_dir / "runs"
    stack = LocalStack(tiny_stack_config(work_dir, policy, models, run_root))
    with console.status("starting Redis, rollout (vLLM), reward, trainer, judge"):
        info = stack.up()
    try:
        console.print("stack up: " + ", ".join(f"{k} {v}" for k, v in info.urls.items()) + f", redis {info.redis_url}")
        console.rule("4/4 semi-online run")
        run_id = options.run_id or time.strftime("demo-%Y%m%d-%H%M%S")
        config = RunConfig(
            run_id=run_id, iterations=options.iterations, queries_per_iteration=options.queries,
            responses_per_query=options.responses, loss=options.loss, rope=rope,
        )  # fmt: skip
        run = SemiOnlineRun(
            RunOptions(config=config, run_dir=run_root / run_id, eval_limit=options.eval_limit,
                       eval_n=options.eval_n, eval_max_tokens=options.eval_max_tokens),
            info, console,
        )  # fmt: skip
        report = run.run()
    finally:
        with console.status("stopping the stack"):
            stack.down()
    console.print(f"demo finished in {time.perf_counter() - started:.0f}s; report: {report}")
    return report
