"""Run-wide configuration shared through Redis, so every service agrees on it.

``grace run`` writes it once per run id; the trainer reads the loss and the
epochs from it, the rollout worker K and m. Stored as JSON at
``grace:run:<run_id>``.

The two modes of the paper:

* semi-online: ``iterations`` rounds of K generated queries, each sampled from
  the adapter the previous round trained;
* offline (``offline=True``): one round holding the whole query set, generated
  once, sampled once from the starting policy, calibrated as one dataset and
  trained ``epochs`` epochs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import redis
from pydantic import BaseModel, Field

from shared.jsonl import read_jsonl, write_jsonl
from shared.rope import RopeConfig
from shared.schemas import WeightedSample

LOSSES = ("grace_kto", "kto", "dpo", "orpo", "sft", "grpo")


class RunConfig(BaseModel):
    run_id: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    iterations: int = Field(3, ge=1)
    queries_per_iteration: int = Field(8, ge=1, description="K")
    responses_per_query: int = Field(8, ge=2, description="m")
    loss: Literal["grace_kto", "kto", "dpo", "orpo", "sft", "grpo"] = "grace_kto"
    offline: bool = Field(False, description="the paper's GRACE (offline): one round over the whole query set")
    total_queries: int | None = Field(None, ge=1, description="query budget N (paper: 1000); the last round holds the remainder")
    epochs: int | None = Field(None, ge=1, description="epochs per round (unset = the trainer's setting; paper: 1)")
    seed: int | None = Field(
        None, description="the run's seed: query plan, sampling, LoRA init and batch order (unset = each service's setting)"
    )
    max_staleness: int | None = Field(
        0,
        ge=0,
        description="adapter versions a trained sample may lag behind the on-policy one; 0 = on-policy as the "
        "paper (stale samples are counted and dropped by the trainer); None = train on any",
    )
    rope: RopeConfig | None = Field(
        None,
        description="the run's one RoPE setting (paper 3.6); every service refuses a run that differs from its own "
        "(None = recorded before runs carried it: not checked)",
    )

    @classmethod
    def from_budget(
        cls, run_id: str, *, total_queries: int | None, k: int, iterations: int, offline: bool, **fields
    ) -> "RunConfig":
        """``--total-queries N -k K``: ceil(N/K) semi-online rounds, or one offline round of N queries."""
        if offline:
            k = total_queries or k * iterations
            return cls(run_id=run_id, iterations=1, queries_per_iteration=k, offline=True,
                       total_queries=k, **fields)  # fmt: skip
        if total_queries is not None:
            iterations = math.ceil(total_queries / k)
        return cls(run_id=run_id, iterations=iterations, queries_per_iteration=k, total_queries=total_queries, **fields)

    def queries_in(self, iteration: int) -> int:
        """K of one round: K, except the last round of a budget, which holds what is left of N."""
        if self.total_queries is None:
            return self.queries_per_iteration
        left = self.total_queries - iteration * self.queries_per_iteration
        return max(0, min(self.queries_per_iteration, left))


def _key(run_id: str) -> str:
    return f"grace:run:{run_id}"


def save_run_config(client: redis.Redis, config: RunConfig) -> None:
    client.set(_key(config.run_id), config.model_dump_json())


def load_run_config(client: redis.Redis, run_id: str) -> RunConfig | None:
    raw = client.get(_key(run_id))
    return None if raw is None else RunConfig.model_validate_json(raw)


# --------------------------------------------------------------------------- runs/<id>/samples/iter-NNNN.jsonl


def samples_file(run_root: str | Path, run_id: str, iteration: int) -> Path:
    """What the trainer trained on in one iteration, one line per response."""
    return Path(run_root) / run_id / "samples" / f"iter-{iteration:04d}.jsonl"


def sample_row(sample: WeightedSample) -> dict:
    """One line of the samples file: the query, where it came from, the response and its calibration."""
    return {
        "sample_id": sample.sample_id, "query_id": sample.group_id, "query": sample.query,
        "source": sample.query_source, "response_index": sample.response_index, "response": sample.response,
        "finish_reason": sample.finish_reason, "parsed": sample.parsed,
        "metrics": sample.metrics.model_dump() if sample.metrics else None,
        "rank_sum": sample.rank_sum, "z": sample.z, "weight": sample.weight, "label": sample.label,
        "adapter_version": sample.adapter_version,
    }  # fmt: skip


def write_samples_file(path: Path, samples: Iterable[WeightedSample]) -> Path:
    """Writes the file whole (temp name, then rename), ordered by query and response index."""
    rows = sorted((sample_row(s) for s in samples), key=lambda r: (_natural(r["query_id"]), r["response_index"]))
    return write_jsonl(path, rows)


def _natural(text: str) -> tuple:
    """'run:0:10' after 'run:0:2'."""
    return tuple(int(part) if part.isdigit() else part for part in text.split(":"))


def read_samples_file(path: Path) -> list[dict]:
    return read_jsonl(path)
