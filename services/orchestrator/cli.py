"""`grace stack up`, `grace run`, `grace demo`, `grace experiment`, `grace rollout-iteration`, `grace plan`, `grace eval`
(heavy imports stay inside the functions)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from services.orchestrator.options import REPORT_TO_HELP, DemoOptions, ExperimentOptions
from shared.cli_options import from_options


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
    rollout_replicas: int = typer.Option(
        1, min=1, help="rollout services, each with its own vLLM; runs spread sampling over them"
    ),
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
        False,
        "--offline",
        help="GRACE (offline): N queries generated once, sampled once from the starting policy, "
        "calibrated as one dataset, trained --epochs epochs",
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


@from_options(DemoOptions)
def demo(options: DemoOptions) -> None:
    """The whole loop on the tiny local models: SFT, stack, 3 iterations, report."""
    from services.orchestrator.demo import run_demo

    run_demo(options)


def rollout_iteration(
    iteration: int = typer.Option(..., help="iteration number"),
    run_id: Optional[str] = typer.Option(None, help="run id (default: settings.run_id)"),
    k: Optional[int] = typer.Option(None, help="K queries (default: the run's config, else settings)"),
    m: Optional[int] = typer.Option(None, help="m responses per query (default: the run's config, else settings)"),
    offline: Optional[bool] = typer.Option(
        None, "--offline/--online", help="the offline round: K queries generated once (source offline)"
    ),
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


@from_options(ExperimentOptions)
def experiment(options: ExperimentOptions) -> None:
    """The paper's comparison: every method, same budget, S seeds; table, paired test, figures; last line JSON."""
    import json

    from services.orchestrator.experiment import run_experiment

    typer.echo(json.dumps(run_experiment(options)))


from services.orchestrator.eval_cli import eval_app  # noqa: E402  (heavy imports stay inside its functions)
from services.orchestrator.plan_cli import plan  # noqa: E402

COMMANDS = {"run": run, "demo": demo, "experiment": experiment, "plan": plan, "rollout-iteration": rollout_iteration}
GROUPS = {"stack": stack_app, "eval": eval_app}
