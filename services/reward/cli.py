"""`grace serve reward`, `grace bench reward [--load]`, `grace score FILE.jsonl` (heavy imports stay inside)."""

from __future__ import annotations

from pathlib import Path

import typer

from services.reward.options import RewardBenchOptions, RewardServeOptions
from shared.cli_options import from_options


@from_options(RewardServeOptions)
def serve(options: RewardServeOptions) -> None:
    """Reward service: scoring API (+ the rollouts-stream worker when Redis is configured)."""
    from services.reward.config import RewardSettings

    overrides = {k: v for k, v in {"host": options.host, "port": options.port}.items() if v is not None}
    if options.no_worker:
        overrides["worker"] = False
    settings = RewardSettings(**overrides)
    if options.worker_only:
        _run_worker_only(settings)
        return
    import uvicorn

    from services.reward.app import create_app

    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level.lower())


def _run_worker_only(settings) -> None:
    import signal
    import threading

    from services.reward.scorer import Scorer
    from services.reward.worker import RewardWorker
    from shared.local_redis import connect

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    client = connect(settings.redis_url)
    scorer = Scorer(settings)
    RewardWorker(client, scorer.score, settings).run(stop)


def score(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help="JSONL lines {query, responses}"),
    url: str = typer.Option(None, help="reward service URL (default: score in-process)"),
    out: Path = typer.Option(None, help="output JSONL (default: FILE.scored.jsonl)"),
    api_key: str = typer.Option(None, envvar="GRACE_REWARD_API_KEY", help="bearer key for --url"),
    batch: int = typer.Option(8, min=1, help="groups per scoring call"),
) -> None:
    """Scores {query, responses} lines; the whole file is one dataset for global normalization (eq. 8-9)."""
    from rich.progress import Progress

    from services.reward.scoring_client import load_groups, score_file
    from shared.service_client import ServiceError

    groups = load_groups(file)
    out = out or file.with_suffix(".scored.jsonl")
    with Progress() as progress:
        task = progress.add_task("scoring", total=sum(len(g.responses) for g in groups))
        try:
            n = score_file(groups, out, url=url, api_key=api_key, batch=batch, advance=lambda k: progress.advance(task, k))
        except ServiceError as exc:  # the service's own message (a 422 names the field), no traceback
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
    typer.echo(f"wrote {n} groups to {out}")


@from_options(RewardBenchOptions)
def bench(options: RewardBenchOptions) -> None:
    """Service scoring path vs the script a user would write (fp32 padded perplexity + FlagEmbedding compute_score);
    with --load, throughput, latency and 503s of C clients for T seconds, with no answer lost or duplicated."""
    if options.load:
        from services.reward.load_bench import run_load_bench

        run_load_bench(options)
        return
    from services.reward.bench import run_bench

    run_bench(options)


COMMANDS = {"score": score}
