"""Settings of the reward service (env prefix ``GRACE_REWARD_``, YAML section ``reward:``)."""

from __future__ import annotations

import os
import socket
from typing import ClassVar, Literal

from pydantic import Field

from shared.settings import ServiceSettings, service_config


class RewardSettings(ServiceSettings):
    section: ClassVar[str] = "reward"
    model_config = service_config("GRACE_REWARD_")
    renamed: ClassVar[dict[str, str]] = {"preset": "model_preset"}  # GRACE_REWARD_PRESET

    host: str = Field("127.0.0.1", description="HTTP bind address")
    port: int = Field(8100, description="HTTP port")

    # compute
    device: str = Field("auto", description="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1', ...")
    dtype: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="'auto' = bf16 on CUDA and on CPUs with native bf16 matmul, else fp32"
    )
    threads: int | None = Field(None, description="torch CPU threads (unset = torch default)")
    gpu_memory_fraction: float | None = Field(
        None,
        gt=0,
        le=1,
        description=(
            "CUDA only: cap of this process's PyTorch allocations, as a fraction of the GPU's memory "
            "(torch.cuda.set_per_process_memory_fraction); set it when the reward shares a GPU with vLLM "
            "(whose share is the rollout's gpu_memory_utilization) or the trainer; unset = no cap"
        ),
    )
    ngram_n: int = Field(
        2, ge=1, description="n of the token n-grams in E (eq. 2; the paper leaves n open, distinct-2 is the usual choice)"
    )
    ppl_window: int | None = Field(None, ge=8, description="perplexity window in tokens (unset = model's native window)")
    ppl_stride: int | None = Field(None, ge=1, description="sliding-window stride (unset = 3/4 of the window)")
    encoder_max_length: int | None = Field(None, ge=8, description="BGE-M3 input limit (unset = encoder's window)")
    max_batch_tokens: int = Field(16384, ge=256, description="padded tokens per forward batch")
    logits_chunk: int = Field(2048, ge=64, description="target tokens per LM-head chunk (bounds logits memory)")
    degenerate_groups: Literal["omega_plus", "exclude"] = Field(
        "omega_plus",
        description=(
            "groups with fewer than 2 parsed responses or all rank sums tied give Z = 0 to their members: "
            "'omega_plus' counts them in |Omega+| as eq. 8 does literally (which raises every other positive "
            "weight); 'exclude' gives them W = 0 and leaves them out of |Omega+| and the eq. 8-9 sums"
        ),
    )

    # HTTP limits (413 for the body, 422 naming the field for the rest)
    max_groups: int = Field(64, ge=1, description="groups per request")
    max_responses: int = Field(64, ge=1, description="responses per group")
    max_response_chars: int = Field(200_000, ge=1, description="characters per response")
    max_query_chars: int = Field(20_000, ge=1, description="characters per query")
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="request body size")
    max_concurrency: int = Field(1, ge=1, description="scoring jobs computed at once")
    max_queue: int = Field(8, ge=0, description="scoring requests allowed to wait; beyond it 503")
    retry_after_s: int = Field(5, ge=1, description="Retry-After of a 503")

    # stream worker
    worker: bool = Field(True, description="run the rollouts-stream worker inside `grace serve reward`")
    consumer_group: str = "reward"
    consumer_name: str = Field(
        default_factory=lambda: f"reward-{socket.gethostname()}-{os.getpid()}",
        description="consumer name in the group; a fixed name lets a restart re-read its own pending entries",
    )
    worker_batch: int = Field(8, ge=1, description="stream entries read (and groups scored) per batch")
    min_idle_ms: int = Field(60_000, ge=1, description="reclaim entries another consumer left pending this long")
    max_deliveries: int = Field(5, ge=1, description="deliveries before an entry goes to the dead-letter stream")
    lock_ttl_ms: int = Field(300_000, ge=1000, description="finalization lock lifetime")
    block_ms: int = Field(1000, ge=1, description="XREADGROUP block time")
