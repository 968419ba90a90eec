"""`grace eval`, `grace eval context`: the paper's tables, z-score plots and the context study
(heavy imports stay inside the functions)."""

from __future__ import annotations

import typer

from services.orchestrator.context import ContextOptions
from services.orchestrator.options import EvalOptions
from shared.cli_options import from_options

eval_app = typer.Typer(help="Evaluation: the paper's tables and z-score plots.")


@eval_app.callback(invoke_without_command=True)
@from_options(EvalOptions)
def evaluate(opts: EvalOptions) -> None:
    """Generate, score and judge the held-out split for each policy; write tables and a z-score plot."""
    from services.orchestrator.evaluation import run_eval

    run_eval(opts)
    for name in ("table_automatic.md", "table_judge.md"):
        path = opts.out_dir / name
        if path.exists():
            typer.echo(path.read_text())
    typer.echo(f"written to {opts.out_dir}")


@eval_app.command("context")
@from_options(ContextOptions)
def context(opts: ContextOptions) -> None:
    """Table 3: perplexity and generated length at 1x/2x/4x the native window, per rope scaling method."""
    from services.orchestrator.context import run_context

    run_context(opts)
    typer.echo((opts.out_dir / "context.md").read_text())
    typer.echo(f"written to {opts.out_dir}")
