"""`grace serve trainer`, `grace bench trainer`, `grace sft` (heavy imports stay inside the functions)."""

from __future__ import annotations

from pathlib import Path

import typer

from services.trainer.bench import BenchOptions
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


def sft(
    data: Path = typer.Option(Path("data/sft.jsonl"), help="jsonl with 'query' and a tagged 'response'"),
    out: Path = typer.Option(..., help="folder of the starting policy (merged model + tokenizer, safetensors)"),
    base: str = typer.Option(None, help="base model folder (default: GRACE_TRAINER_POLICY_MODEL or the tiny policy)"),
    mode: str = typer.Option("full", help="full (all parameters, the paper's SFT) or lora (merged after training)"),
    epochs: int = typer.Option(None, help="passes over the data (default: 1 as the paper; 50 for models under 10M parameters)"),
    lr: float = typer.Option(
        None, help="peak learning rate (default: 1e-6 full / 1e-4 LoRA as the paper; 1e-2 under 10M parameters)"
    ),
    max_steps: int = typer.Option(None, help="stop after this many optimizer steps"),
    batch_size: int = typer.Option(None, help="examples per step (default: 8; 4 under 10M parameters)"),
    max_length: int = typer.Option(2048, help="longest example in tokens (longer responses are cut)"),
    section_tokens: int = typer.Option(
        None, help="cut each tagged section to N tokens (0 = off; default: 16 for models under 10M parameters, else off)"
    ),
    answer_tokens: int = typer.Option(
        None, help="cut answers to a random length up to N tokens, >= --section-tokens (default: off; 128 under 10M parameters)"
    ),
    tag_weight: float = typer.Option(None, help="loss weight of the structure tags (default: 1; 5 under 10M parameters)"),
    target_tag_rate: float = typer.Option(
        None,
        help="train in rounds until this share of sampled seed-query answers parses (default: off; 0.9 under 10M parameters)",
    ),
    max_rounds: int = typer.Option(None, help="most rounds of --epochs epochs (default: 1; 2 under 10M parameters)"),
    query_generation_examples: int = typer.Option(
        None, help="3.2 query-generation turns per epoch (default: 0; 4 under 10M parameters, the demo's generator)"
    ),
    seed: int = typer.Option(0),
    rope: str = typer.Option(
        None, help='the run\'s RoPE setting to check against, as JSON ({"yarn_factor", "native_window", "scope"})'
    ),
) -> None:
    """Supervised fine-tuning under the 3.1 system prompt (loss on response tokens): the starting policy.

    The last stdout line is the summary as JSON (tag rate, rounds, steps, final loss)."""
    import json

    from services.trainer.sft import SftOptions, run_sft
    from shared.rope import RopeConfig

    result = run_sft(SftOptions(data=data, out=out, base=base, mode=mode, epochs=epochs, lr=lr, max_steps=max_steps,
                                batch_size=batch_size, max_length=max_length, seed=seed,
                                section_tokens=section_tokens, answer_tokens=answer_tokens, tag_weight=tag_weight, target_tag_rate=target_tag_rate,
                                max_rounds=max_rounds, query_generation_examples=query_generation_examples,
                                rope=RopeConfig.model_validate_json(rope) if rope else None))  # fmt: skip
    rate = "" if result["tag_rate"] is None else f" tag_rate={result['tag_rate']:.2f}"
    typer.echo(
        f"policy {result['out']} steps={result['steps']} rounds={len(result['rounds'])} final_loss={result['final_loss']:.4f}{rate}"
    )
    typer.echo(json.dumps(result, default=str))


COMMANDS = {"sft": sft}
