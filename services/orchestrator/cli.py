"""`grace stack up`, `grace run`, `grace demo`, `grace experiment`, `grace rollout-iteration`, `grace plan`, `grace eval`
(heavy imports stay inside the functions)."""

from __future__ import annotations

from pathlib import Path

import typer

from services.orchestrator.options import DemoOptions, ExperimentOptions, RolloutIterationOptions, RunCommandOptions, StackOptions
from shared.cli_options import from_options

stack_app = typer.Typer(help="The local stack: Redis + rollout, reward, trainer, judge.", no_args_is_help=True)


@stack_app.command("up")
@from_options(StackOptions)
def up(options: StackOptions) -> None:
    """Start the stack, print its URLs, restart services that die; Ctrl-C stops everything."""
    import logging

    from services.orchestrator.stack import LocalStack, StackConfig

    o = options
    common = {"adapter_root": str((o.adapter_root or o.stack_dir / "adapters").resolve()),
              "run_root": str((o.run_root or Path("runs")).resolve())}  # fmt: skip
    if o.policy_model:
        common["policy_model"] = o.policy_model
    config = StackConfig(stack_dir=o.stack_dir, services=o.services, common=common, rollout_replicas=o.rollout_replicas)
    stack = LocalStack(config)
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


@from_options(RunCommandOptions)
def run(options: RunCommandOptions) -> None:
    """A semi-online GRACE-KTO run on a running stack; writes runs/<id>/report.md."""
    from services.orchestrator.loop import SemiOnlineRun
    from services.orchestrator.stack import StackInfo

    info = StackInfo.load(options.stack_dir / "stack.json")
    SemiOnlineRun(options.run_options(), info).run()


@from_options(DemoOptions)
def demo(options: DemoOptions) -> None:
    """The whole loop on the tiny local models: SFT, stack, 3 iterations, report."""
    from services.orchestrator.demo import run_demo

    run_demo(options)


@from_options(RolloutIterationOptions)
def rollout_iteration(options: RolloutIterationOptions) -> None:
    """Runs one rollout worker iteration: plan K queries, sample m responses each, publish the groups."""
    import asyncio
    import json
    import logging

    from services.orchestrator.rollout import run_iteration
    from services.rollout.config import RolloutSettings
    from shared.local_redis import connect

    for name in ("httpx", "httpx2"):  # one INFO line per request otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    o = options
    overrides = {key: v for key, v in {"run_id": o.run_id, "gateway_url": o.gateway_url}.items() if v is not None}
    settings = RolloutSettings(**overrides)
    client = connect(settings.redis_url)
    result = asyncio.run(run_iteration(settings, client, o.iteration, k=o.k, m=o.m, offline=o.offline))
    typer.echo(json.dumps(result.__dict__))


@from_options(ExperimentOptions)
def experiment(options: ExperimentOptions) -> None:
    """The paper's comparison: every method, same budget, S seeds; table, paired test, figures; last line JSON."""
    import json

    from services.orchestrator.experiment import run_experiment

    typer.echo(json.dumps(run_experiment(options)))


from services.orchestrator.chaos import bench as chaos_bench  # noqa: E402  (heavy imports stay inside)
from services.orchestrator.eval_cli import eval_app  # noqa: E402  (heavy imports stay inside its functions)
from services.orchestrator.plan_cli import plan  # noqa: E402

COMMANDS = {"run": run, "demo": demo, "experiment": experiment, "plan": plan, "rollout-iteration": rollout_iteration}
GROUPS = {"stack": stack_app, "eval": eval_app}
BENCHES = {"chaos": chaos_bench}
