"""`grace serve trainer`, `grace bench trainer`, `grace sft` (heavy imports stay inside the functions)."""

from __future__ import annotations

import typer

from services.trainer.bench import BenchOptions
from services.trainer.sft import SftOptions
from shared.cli_options import from_options


def serve() -> None:
    """Trainer worker: weighted samples from Redis -> one epoch per iteration -> LoRA adapters + events.

    A Redis consumer with no HTTP API, hence no --host/--port (`grace serve trainer --port 1` is an error)."""
    from services.trainer.config import TrainerSettings
    from services.trainer.train import init_distributed
    from services.trainer.worker import TrainerWorker
    from shared.local_redis import connect

    settings = TrainerSettings()
    if settings.num_threads:
        import torch

        torch.set_num_threads(settings.num_threads)
    init_distributed(settings)
    TrainerWorker(settings, connect(settings.redis_url)).run()


@from_options(BenchOptions)
def bench(options: BenchOptions) -> None:
    """One GRACE-KTO epoch vs TRL's KTOTrainer (speed, peak memory) and vs DPO (peak memory), same run."""
    from services.trainer.bench import run_bench

    run_bench(options)


@from_options(SftOptions)
def sft(options: SftOptions) -> None:
    """Supervised fine-tuning under the 3.1 system prompt (loss on response tokens): the starting policy.

    The last stdout line is the summary as JSON (tag rate, rounds, steps, final loss)."""
    import json

    from services.trainer.sft import run_sft

    result = run_sft(options)
    rate = "" if result["tag_rate"] is None else f" tag_rate={result['tag_rate']:.2f}"
    typer.echo(
        f"policy {result['out']} steps={result['steps']} rounds={len(result['rounds'])} final_loss={result['final_loss']:.4f}{rate}"
    )
    typer.echo(json.dumps(result, default=str))


COMMANDS = {"sft": sft}
