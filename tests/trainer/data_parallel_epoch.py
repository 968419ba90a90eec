"""One epoch of every loss on fixed samples, single-process or under ``torchrun`` (used by test_data_parallel).

    python -m tests.trainer.data_parallel_epoch POLICY OUT               # one process
    torchrun --nproc-per-node 2 -m tests.trainer.data_parallel_epoch POLICY OUT   # two gloo ranks
    torchrun ... POLICY OUT --no-sync   # the control: ranks skip the gradient all-reduce

Every rank starts from the same seeded LoRA init and trains its share of each batch; rank 0 saves
each loss's trained LoRA weights to ``OUT/<loss>.pt``.
"""

from __future__ import annotations

import random
import sys
import tempfile
from pathlib import Path

import torch

from services.trainer import train
from services.trainer.config import TrainerSettings
from services.trainer.model import load_policy
from services.trainer.train import Trainer, init_distributed, rank_world
from shared.schemas import WeightedSample

LOSSES = ("grace_kto", "kto", "dpo", "orpo", "sft", "grpo")
WORDS = "reform governance capital strategy market report policy river forest banana weather guitar".split()


def samples(groups: int = 2, per_group: int = 4) -> list[WeightedSample]:
    rng = random.Random(0)
    out = []
    for g in range(groups):
        zs = [rng.uniform(-1.5, 1.5) for _ in range(per_group)]
        for i, z in enumerate(zs):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 24)))
            out.append(WeightedSample(
                run_id="ddp", iteration=0, sample_id=f"g{g}:{i}", group_id=f"g{g}", response_index=i,
                query=f"Write a report on topic {g}", response=f"<summary>{text}</summary><answer>{text}</answer>",
                weight=z, z=z, label="desirable" if z >= 0 else "undesirable", parsed=True,
            ))  # fmt: skip
    return out


def main(policy: str, out: Path) -> None:
    root = Path(tempfile.mkdtemp(prefix="grace-ddp-"))
    settings = TrainerSettings(
        policy_model=policy, adapter_root=root / "adapters", run_root=root / "runs", lora_rank=8, lora_alpha=16,
        learning_rate=2e-3, min_learning_rate=2e-4, batch_size=4, epochs=2, sft_weight=0.1, num_threads=None,
    )  # fmt: skip
    init_distributed(settings)
    rank, _ = rank_world()
    for loss in LOSSES:
        torch.manual_seed(0)  # the same LoRA init on every rank and in the single process
        model, tokenizer, runtime = load_policy(settings)
        Trainer(model, tokenizer, settings, runtime, loss=loss).train(samples())
        if rank == 0:
            lora = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if "lora_" in n}
            torch.save(lora, out / f"{loss}.pt")


if __name__ == "__main__":
    if "--no-sync" in sys.argv:
        train.average_gradients = lambda params: None
    main(sys.argv[1], Path(sys.argv[2]))
