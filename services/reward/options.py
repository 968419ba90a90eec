"""The options of `grace serve reward` and `grace bench reward`: each field is also its CLI option
(shared/cli_options.py). Kept apart from the benches, which import torch, since the CLI loads these to build its commands."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shared.cli_options import opt


@dataclass
class RewardServeOptions:
    host: str | None = opt(None, "bind address (default: settings, 127.0.0.1)")
    port: int | None = opt(None, "port (default: settings, 8100)")
    no_worker: bool = opt(False, "HTTP API only, no rollouts-stream worker", "--no-worker")
    worker_only: bool = opt(False, "the rollouts-stream worker only, no HTTP", "--worker-only")


@dataclass
class RewardBenchOptions:
    queries: int = opt(2, "queries (x m responses each) in the workload; with --load, per request", min=1)
    responses: int = opt(8, "m: responses per query", min=2)
    preset: str | None = opt(None, "model preset (default: small, tens of millions of params; tiny with --load)")
    max_doc_tokens: int = opt(2600, "longest document, in tokens (> the 2048 window)")
    models: Path | None = opt(None, "an already built model set folder (default: the cached preset set)")
    dtype: str = opt("auto", "service path dtype: auto (bf16 where the CPU has it), bf16, fp32")
    threads: int = opt(1, "torch threads for both paths and the matmul bound (0 = torch default); on a shared machine 1 "
                       "avoids OpenMP threads waiting on a preempted peer", min=0)  # fmt: skip
    out_dir: Path | None = opt(None, "run folder for the table and JSON (default: runs/bench-reward-<time>)")
    seed: int = 0
    load: bool = opt(False, "load test: concurrent clients against POST /v1/score", "--load")
    clients: int = opt(8, "--load: concurrent clients (C)", min=1)
    seconds: float = opt(30.0, "--load: seconds new requests are started (T)", min=0.1)
    url: str | None = opt(None, "--load: reward service to load (default: start one, small admission limits)")
    api_key: str | None = opt(None, "--load: bearer key for --url", envvar="GRACE_REWARD_API_KEY")
    naive_batch: int = opt(8, cli=False)  # batch of the naive script's perplexity
