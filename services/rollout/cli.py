"""`grace serve rollout`, `grace bench rollout` (heavy imports stay inside)."""

from __future__ import annotations

import logging
from typing import Optional

import typer

from services.rollout.bench import BenchConfig
from shared.cli_options import from_options

log = logging.getLogger("services.rollout")


def serve(
    host: Optional[str] = typer.Option(None, help="gateway bind address (default: settings.host)"),
    port: Optional[int] = typer.Option(None, help="gateway port (default: settings.port)"),
) -> None:
    """vLLM (child process) + the `policy` gateway + the adapter manager, until SIGINT/SIGTERM."""
    from services.rollout.config import RolloutSettings
    from services.rollout.service import RolloutService

    overrides = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    raise typer.Exit(RolloutService(RolloutSettings(**overrides)).run())


@from_options(BenchConfig)
def bench(config: BenchConfig) -> None:
    """Service (gateway + adapter) vs raw vLLM vs transformers generate; hot-swap latency. Last line: JSON."""
    from services.rollout.bench import run_bench

    run_bench(config)
