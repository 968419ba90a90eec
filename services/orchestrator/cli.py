"""`grace stack up`, `grace run`, `grace demo`, `grace experiment`, `grace rollout-iteration`, `grace plan`, `grace eval`
(heavy imports stay inside the functions)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

REPORT_TO_HELP = (
    "also record trainer steps, iteration records and evaluation tables in: none, all, or a comma-separated "
    "list of tensorboard, mlflow, wandb (files under the run folder's tracking/; MLflow local unless "
    "MLFLOW_TRACKING_URI is set, W&B offline unless WANDB_MODE is set)"
)


def report_to_option(value: str) -> tuple[str, ...]:
    """``--report-to`` checked before any work starts: an unknown backend or a missing package is a usage error."""
    from shared.tracking import parse_report_to

    try:
        return parse_report_to(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--report-to") from None


stack_app = typer.Typer(help="The local stack: Redis + rollout, reward, trainer, judge.", no_args_is_help=True)


@stack_app.command("up")
def up(
    stack_dir: Path = typer.Option(Path("runs/stack"), help="settings, logs, Redis data and stack.json go here"),
    services: str = typer.Option("rollout,reward,trainer,judge", help="comma-separated services to start"),
    policy_model: Optional[str] = typer.Option(None, help="policy model folder (default: settings / tiny set)"),
    adapter_root: Optional[Path] = typer.Option(None, help="adapter store (default: <stack-dir>/adapters)"),
    run_root: Optional[Path] = typer.Option(None, help="run folders (default: runs)"),
    rollout_replicas: int = typer.Option(1, min=1, help="rollout services, each with its own vLLM; runs spread sampling over them"),
) -> None:
    """Start the stack, print its URLs, restart services that die; Ctrl-C stops everything."""
    import logging

    from services.orchestrator.stack import LocalStack, StackConfig

    common = {"adapter_root": str((adapter_root or stack_dir / "adapters").resolve()),
              "run_root": str((run_root or Path("runs")).resolve())}  # fmt: skip
    if policy_model:
        common["policy_model"] = policy_model
    names = tuple(s.strip() for s in services.split(",") if s.strip())
    stack = LocalStack(StackConfig(stack_dir=stack_dir, services=names, common=common, rollout_replicas=rollout_replicas))
    try:
        info = stack.up()
        for name, url in info.urls.items():
            typer.echo(f"{name:8s} {url}")
        for i, url in enumerate(info.rollout_urls[1:], start=2):
            typer.echo(f"rollout-{i} {url}")
        typer.echo(f"redis    {info.redis_url}\nlogs     {stack.dir / 'logs'}\nstack up; Ctrl-C to stop")
        stack.supervise()
    except Exception as exc:
        logging.getLogger(__name__).error("event=stack_failed error=%s", exc)
        raise typer.Exit(1)
    finally:
        stack.down()


def run(
    run_id: str = typer.Option(..., help="run id; the same id continues an interrupted run"),
    iterations: int = typer.Option(3, help="semi-online iterations (ignored with --total-queries)"),
    queries: int = typer.Option(8, "--queries", "-k", help="K new queries per iteration (paper: 250 or 500)"),
    total_queries: Optional[int] = typer.Option(
        None, "--total-queries", "-n", min=1, help="query budget N (paper: 1000): ceil(N/K) iterations; offline: all N at once"
    ),
    responses: int = typer.Option(8, "--responses", "-m", help="m responses per query (paper: 8)"),
    loss: str = typer.Option("grace_kto", help="grace_kto, or a baseline: kto, dpo, orpo, sft, grpo"),
    offline: bool = typer.Option(
        False, "--offline", help="GRACE (offline): N queries generated once, sampled once from the starting policy, "
        "calibrated as one dataset, trained --epochs epochs"
    ),
    epochs: Optional[int] = typer.Option(None, min=1, help="epochs per round (default: the trainer's setting, 1)"),
    stack_dir: Path = typer.Option(Path("runs/stack"), help="folder of the running stack (its stack.json)"),
    run_root: Path = typer.Option(Path("runs"), help="the run folder is <run-root>/<run-id>"),
    eval_limit: int = typer.Option(8, help="held-out requests evaluated per iteration"),
    judge: bool = typer.Option(False, help="also judge the held-out responses with the judge service"),
    report_to: str = typer.Option("none", "--report-to", help=REPORT_TO_HELP),
) -> None:
    """A semi-online GRACE-KTO run on a running stack; writes runs/<id>/report.md."""
    from services.orchestrator.loop import RunOptions, SemiOnlineRun
    from services.orchestrator.stack import StackInfo
    from shared.runs import RunConfig
    from shared.tracking import TrackingOptions

    tracking = TrackingOptions(report_to=report_to_option(report_to))
    info = StackInfo.load(stack_dir / "stack.json")
    config = RunConfig.from_budget(run_id, total_queries=total_queries, k=queries, iterations=iterations,
                                   offline=offline, responses_per_query=responses, loss=loss, epochs=epochs)  # fmt: skip
    options = RunOptions(config=config, run_dir=run_root / run_id, eval_limit=eval_limit, judge=judge, tracking=tracking)
    SemiOnlineRun(options, info).run()


def demo(
    work_dir: Path = typer.Option(Path("runs/demo"), help="models, SFT policy, stack and runs go here"),
    run_id: Optional[str] = typer.Option(None, help="continue this run id (default: a new one)"),
    iterations: int = typer.Option(3),
    queries: int = typer.Option(8, "--queries", "-k", help="new queries per iteration (K)"),
    responses: int = typer.Option(8, "--responses", "-m", help="responses per query (m; paper: 8)"),
    loss: str = typer.Option("grace_kto"),
) -> None:
    """The whole loop on the tiny local models: SFT, stack, 3 iterations, report."""
    from services.orchestrator.demo import DemoOptions, run_demo

    run_demo(DemoOptions(work_dir=work_dir, run_id=run_id, iterations=iterations, queries=queries,
                         responses=responses, loss=loss))  # fmt: skip


def rollout_iteration(
    iteration: int = typer.Option(..., help="iteration number"),
    run_id: Optional[str] = typer.Option(None, help="run id (default: settings.run_id)"),
    k: Optional[int] = typer.Option(None, help="K queries (default: the run's config, else settings)"),
    m: Optional[int] = typer.Option(None, help="m responses per query (default: the run's config, else settings)"),
    offline: Optional[bool] = typer.Option(None, "--offline/--online", help="the offline round: K queries generated once (source offline)"),
    gateway_url: Optional[str] = typer.Option(None, help="rollout gateway URL (default: settings.gateway_url)"),
) -> None:
    """Runs one rollout worker iteration: plan K queries, sample m responses each, publish the groups."""
    import asyncio
    import json
    import logging

    from services.orchestrator.rollout import run_iteration
    from services.rollout.config import RolloutSettings
    from shared.local_redis import connect

    for name in ("httpx", "httpx2"):  # one INFO line per request otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    overrides = {k_: v for k_, v in {"run_id": run_id, "gateway_url": gateway_url}.items() if v is not None}
    settings = RolloutSettings(**overrides)
    client = connect(settings.redis_url)
    result = asyncio.run(run_iteration(settings, client, iteration, k=k, m=m, offline=offline))
    typer.echo(json.dumps(result.__dict__))


def experiment(
    name: str = typer.Option("experiment", "--name", help="experiment id: outputs in <run-root>/<name>/, cells <name>-<method>-s<seed>"),
    methods: str = typer.Option("sft,kto,dpo,orpo,grace_offline,grace,grpo", help="comma-separated methods"),
    seeds: int = typer.Option(3, min=1, help="seeds per method (S)"),
    total_queries: Optional[int] = typer.Option(24, "--total-queries", "-n", min=0, help="query budget N of every method (0: K x --iterations)"),
    k: int = typer.Option(8, "-k", help="K queries per semi-online round: ceil(N/K) rounds"),
    m: int = typer.Option(8, "-m", help="m responses per query"),
    iterations: int = typer.Option(3, help="semi-online rounds when --total-queries is 0 (N = K x rounds)"),
    epochs: Optional[int] = typer.Option(None, min=1, help="epochs per round (default: the trainer's setting)"),
    eval_limit: int = typer.Option(12, help="held-out queries evaluated per policy (0: all)"),
    eval_n: int = typer.Option(4, help="samples per held-out query"),
    stack_dir: Optional[Path] = typer.Option(None, help="use this running stack (its stack.json); default: bring up the tiny stack"),
    run_root: Path = typer.Option(Path("runs"), help="outputs go to <run-root>/<name>/"),
    sft_dir: Path = typer.Option(Path("runs/demo"), help="own tiny stack: the demo's SFT policy is built or reused here"),
    report_to: str = typer.Option("none", "--report-to", help=REPORT_TO_HELP.replace("the run folder's ", "<run-root>/<name>/")),
) -> None:
    """The paper's comparison: every method, same budget, S seeds; table, paired test, figures; last line JSON."""
    import json

    from services.orchestrator.experiment import ExperimentOptions, run_experiment

    options = ExperimentOptions(
        name=name, methods=tuple(x.strip() for x in methods.split(",") if x.strip()), seeds=seeds,
        total_queries=total_queries or None, k=k, m=m, iterations=iterations, epochs=epochs, eval_limit=eval_limit or None,
        eval_n=eval_n, run_root=run_root, stack_dir=stack_dir, sft_dir=sft_dir, report_to=report_to_option(report_to),
    )  # fmt: skip
    typer.echo(json.dumps(run_experiment(options)))


from services.orchestrator.eval_cli import eval_app  # noqa: E402  (heavy imports stay inside its functions)
from services.orchestrator.plan_cli import plan  # noqa: E402

COMMANDS = {"run": run, "demo": demo, "experiment": experiment, "plan": plan, "rollout-iteration": rollout_iteration}
GROUPS = {"stack": stack_app, "eval": eval_app}
