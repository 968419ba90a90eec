"""The ``grace`` command line.

Each service contributes its commands from ``services/<name>/cli.py``
(imports of heavy libraries stay inside the functions, so ``grace --help``
is instant):

- ``serve``: the function behind ``grace serve <name>``;
- ``bench`` (optional): ``grace bench <name>``; ``BENCHES`` (optional): more benches, name -> function;
- ``COMMANDS`` (optional): extra top-level commands, name -> function;
- ``GROUPS`` (optional): extra top-level command groups, name -> typer.Typer.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import typer

SERVICES = ("rollout", "reward", "trainer", "judge", "orchestrator")

app = typer.Typer(help="GRACE-KTO: semi-online alignment for long structured documents.", no_args_is_help=True)
serve_app = typer.Typer(help="Run a service.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks: speed and memory vs a baseline measured in the same run.", no_args_is_help=True)
models_app = typer.Typer(help="Local model sets.", no_args_is_help=True)
app.add_typer(serve_app, name="serve")
app.add_typer(bench_app, name="bench")
app.add_typer(models_app, name="models")


@app.callback()
def main(log_level: str = typer.Option("INFO", envvar="GRACE_LOG_LEVEL", help="logging level")) -> None:
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    for noisy in ("httpx", "httpx2", "httpcore", "openai._base_client"):  # one line per request otherwise
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


@models_app.command("tiny")
def models_tiny(
    out_dir: Path = typer.Argument(..., help="where to write the model set"),
    preset: str = typer.Option("tiny", help="tiny (tests, demo) or small (benchmarks, tens of M params)"),
    force: bool = typer.Option(False, help="rebuild even if present"),
) -> None:
    """Build the local model set: tokenizer, policy/general, domain, BGE-M3-format encoder."""
    from shared.tiny_models import build_model_set

    paths = build_model_set(out_dir, preset=preset, force=force)
    for name, path in paths.as_dict().items():
        typer.echo(f"{name:10s} {path}")


def _register_service(name: str) -> None:
    try:
        module = importlib.import_module(f"services.{name}.cli")
    except ModuleNotFoundError as exc:
        if exc.name not in (f"services.{name}", f"services.{name}.cli"):
            raise
        return
    if hasattr(module, "serve"):
        serve_app.command(name)(module.serve)
    for bench_name, function in {**({name: module.bench} if hasattr(module, "bench") else {}),
                                 **getattr(module, "BENCHES", {})}.items():  # fmt: skip
        bench_app.command(bench_name)(function)
    for command_name, function in getattr(module, "COMMANDS", {}).items():
        app.command(command_name)(function)
    for group_name, group in getattr(module, "GROUPS", {}).items():
        app.add_typer(group, name=group_name)


for _name in SERVICES:
    _register_service(_name)


if __name__ == "__main__":
    app()
