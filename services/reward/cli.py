"""`grace serve reward`, `grace bench reward [--load]`, `grace score FILE.jsonl` (heavy imports stay inside)."""

from __future__ import annotations

from pathlib import Path

import typer


def serve(
    host: str = typer.Option(None, help="bind address (default: settings, 127.0.0.1)"),
    port: int = typer.Option(None, help="port (default: settings, 8100)"),
    no_worker: bool = typer.Option(False, "--no-worker", help="HTTP API only, no rollouts-stream worker"),
    worker_only: bool = typer.Option(False, "--worker-only", help="the rollouts-stream worker only, no HTTP"),
) -> None:
    """Reward service: scoring API (+ the rollouts-stream worker when Redis is configured)."""
    from services.reward.config import RewardSettings

    overrides = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    if no_worker:
        overrides["worker"] = False
    settings = RewardSettings(**overrides)
    if worker_only:
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

    from services.reward.client import RewardServiceError
    from services.reward.scoring_client import load_groups, score_file

    groups = load_groups(file)
    out = out or file.with_suffix(".scored.jsonl")
    with Progress() as progress:
        task = progress.add_task("scoring", total=sum(len(g.responses) for g in groups))
        try:
            n = score_file(groups, out, url=url, api_key=api_key, batch=batch, advance=lambda k: progress.advance(task, k))
        except RewardServiceError as exc:  # the service's own message (a 422 names the field), no traceback
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
    typer.echo(f"wrote {n} groups to {out}")


def bench(
    queries: int = typer.Option(2, min=1, help="queries (x m responses each) in the workload; with --load, per request"),
    responses: int = typer.Option(8, min=2, help="m: responses per query"),
    preset: str = typer.Option(None, help="model preset (default: small, tens of millions of params; tiny with --load)"),
    max_doc_tokens: int = typer.Option(2600, help="longest document, in tokens (> the 2048 window)"),
    models: Path = typer.Option(None, help="an already built model set folder (default: the cached preset set)"),
    dtype: str = typer.Option("auto", help="service path dtype: auto (bf16 where the CPU has it), bf16, fp32"),
    threads: int = typer.Option(
        1,
        min=0,
        help="torch threads for both paths and the matmul bound (0 = torch default); on a shared "
        "machine 1 avoids OpenMP threads waiting on a preempted peer",
    ),
    out_dir: Path = typer.Option(None, help="run folder for the table and JSON (default: runs/bench-reward-<time>)"),
    seed: int = typer.Option(0),
    load: bool = typer.Option(False, "--load", help="load test: concurrent clients against POST /v1/score"),
    clients: int = typer.Option(8, min=1, help="--load: concurrent clients (C)"),
    seconds: float = typer.Option(30.0, min=0.1, help="--load: seconds new requests are started (T)"),
    url: str = typer.Option(None, help="--load: reward service to load (default: start one, small admission limits)"),
    api_key: str = typer.Option(None, envvar="GRACE_REWARD_API_KEY", help="--load: bearer key for --url"),
) -> None:
    """Service scoring path vs the script a user would write (fp32 padded perplexity + FlagEmbedding compute_score);
    with --load, throughput, latency and 503s of C clients for T seconds, with no answer lost or duplicated."""
    if load:
        from services.reward.load_bench import run_load_bench

        run_load_bench(
            clients=clients, seconds=seconds, url=url, api_key=api_key if url else None, groups=queries,
            responses=responses, preset=preset or "tiny", dtype=dtype, threads=threads or None, out_dir=out_dir,
            seed=seed,
        )  # fmt: skip
        return
    from services.reward.bench import run_bench

    run_bench(
        queries=queries, responses=responses, preset=preset or "small", max_doc_tokens=max_doc_tokens,
        models_dir=models, dtype=dtype, threads=threads or None, out_dir=out_dir, seed=seed,
    )  # fmt: skip


COMMANDS = {"score": score}
