"""Which training samples move the answer length L: trains a policy on one iteration's weighted samples
(``runs/<id>/samples/iter-NNNN.jsonl``) with all of them, only the positives or only the negatives (same
GRACE-KTO loss, LoRA r16, lr, epochs), then samples the held-out queries (24 x 4, temperature 1, top-p
0.95, under the demo's YaRN) with several sampling seeds and prints the mean parsed answer length and
the parse rate per variant and seed; the last line is JSON.

    python scripts/length_probe.py runs/demo/policy-sft runs/demo/runs/<id>/samples/iter-0000.jsonl --epochs 6
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

os.environ.setdefault("GRACE_TRAINER_ROPE_SCOPE", "inference_and_training")  # as the demo trains and samples

from services.trainer.config import TrainerSettings  # noqa: E402
from services.trainer.model import load_policy  # noqa: E402
from services.trainer.sft import probe_queries, sample_answers  # noqa: E402
from services.trainer.train import Trainer  # noqa: E402
from shared.jsonl import read_jsonl  # noqa: E402
from shared.parsing import extract_structured  # noqa: E402
from shared.schemas import WeightedSample  # noqa: E402

VARIANTS = {"none": None, "all": lambda s: True, "positives": lambda s: s.weight > 0, "negatives": lambda s: s.weight <= 0}


def held_out_lengths(model, tokenizer, queries: list[str], per_query: int, seed: int) -> dict[str, float]:
    answers = sample_answers(model, tokenizer, [q for q in queries for _ in range(per_query)], 600, seed)
    parts = [extract_structured(a) for a in answers]
    lengths = [len(tokenizer(p.answer, add_special_tokens=False)["input_ids"]) for p in parts if p]
    return {"L": round(statistics.mean(lengths), 1) if lengths else None, "parsed": round(len(lengths) / len(parts), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("policy")
    parser.add_argument("samples", type=Path)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--queries", type=Path, default=Path("data/test_queries.jsonl"))
    args = parser.parse_args()
    samples = [WeightedSample(run_id="probe", iteration=0, sample_id=r["sample_id"], group_id=r["query_id"],
                              response_index=r["response_index"], query=r["query"], response=r["response"],
                              weight=r["weight"], label=r["label"], parsed=r["parsed"], z=r.get("z"))
               for r in read_jsonl(args.samples)]  # fmt: skip
    queries = probe_queries(args.queries, 24)
    report = {}
    for name, keep in VARIANTS.items():
        settings = TrainerSettings(policy_model=args.policy, lora_rank=16, lora_alpha=32, learning_rate=args.lr,
                                   min_learning_rate=args.lr / 10, epochs=args.epochs, seed=0)  # fmt: skip
        model, tokenizer, runtime = load_policy(settings)
        if keep is not None:
            Trainer(model, tokenizer, settings, runtime).train([s for s in samples if keep(s)])
        report[name] = [held_out_lengths(model, tokenizer, queries, 4, seed) for seed in range(args.seeds)]
        print(name, report[name], flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
