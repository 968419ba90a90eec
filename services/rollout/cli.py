"""`grace serve rollout`, `grace bench rollout` (heavy imports stay inside)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

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


def bench(
    presets: str = typer.Option("tiny,small", help="comma-separated local model presets to measure"),
    queries: int = typer.Option(8, help="K queries of the workload"),
    responses: int = typer.Option(4, help="m responses per query"),
    min_tokens: int = typer.Option(64, help="shortest response (tokens)"),
    max_tokens: int = typer.Option(256, help="longest response (tokens); lengths vary between the two"),
    repeats: int = typer.Option(3, help="timed (service, raw vLLM) pass pairs; medians count"),
    out_dir: Path = typer.Option(Path("runs/bench/rollout"), help="table, plot and JSON go here"),
) -> None:
    """Service (gateway + adapter) vs raw vLLM vs transformers generate; hot-swap latency. Last line: JSON."""
    from services.rollout.bench import BenchConfig, run_bench

    config = BenchConfig(
        presets=[p.strip() for p in presets.split(",") if p.strip()], queries=queries, responses=responses,
        min_tokens=min_tokens, max_tokens=max_tokens, repeats=repeats, out_dir=out_dir,
    )  # fmt: skip
    run_bench(config)
