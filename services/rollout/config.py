"""Settings of the rollout service: vLLM, the gateway, the adapter manager, the worker.

Environment prefix ``GRACE_ROLLOUT_`` (e.g. ``GRACE_ROLLOUT_MAX_N=16``),
YAML section ``rollout:``. The RoPE setting (``yarn_factor``, ``native_window``,
``rope_scope``) is common to every service: set it in ``common:``. The paper's sampling defaults (m = 8, top-p) are
written once here.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from shared.settings import ServiceSettings, service_config


class RolloutSettings(ServiceSettings):
    section: ClassVar[str] = "rollout"
    model_config = service_config("GRACE_ROLLOUT_")
    renamed: ClassVar[dict[str, str]] = {"tiny_preset": "model_preset"}  # GRACE_ROLLOUT_TINY_PRESET

    # ---------------------------------------------------------------- gateway (the port users call)
    host: str = Field("0.0.0.0", description="gateway bind address")
    port: int = Field(8000, description="gateway port: OpenAI API, /health, /admin/adapters")
    policy_name: str = Field("policy", description="stable model name that always maps to the newest adapter")
    max_body_bytes: int = Field(8 << 20, description="largest request body accepted (413 above)")
    max_in_flight: int = Field(512, description="requests proxied at once; more get 429")
    max_n: int = Field(64, description="largest `n` (responses per request) accepted")
    upstream_timeout_s: float = Field(3600.0, description="read timeout towards vLLM (long documents take a while)")
    upstream_connect_timeout_s: float = Field(
        30.0, gt=0, description="connect, write and pool timeout towards vLLM (10 s gave 502s on a starved 2-core machine)"
    )

    # ---------------------------------------------------------------- vLLM (a child process on a loopback port)
    vllm_host: str = Field("127.0.0.1", description="vLLM bind address (loopback: only the gateway talks to it)")
    vllm_port: int = Field(0, description="vLLM port (0 = a free one)")
    vllm_url: str | None = Field(None, description="use an already running vLLM instead of starting one")
    served_model_name: str = Field("base", description="vLLM name of the base model (what `policy` means before any adapter)")
    dtype: str = Field("auto", description="vLLM --dtype (auto = bfloat16 on GPU and CPU)")
    # yarn_factor, native_window, rope_scope: the run's one RoPE setting, on ServiceSettings (``common:``)
    max_model_len: int | None = Field(None, description="unset = yarn_factor x native window (32k for an 8k model)")
    enable_lora: bool = True
    max_lora_rank: int = Field(64, description="largest adapter rank accepted (paper: 64)")
    max_loras: int = Field(3, description="adapters active in one batch: >= 2 so old and new overlap during a swap")
    kv_cache_bytes: str | None = Field(
        None, description="--kv-cache-memory-bytes (unset: 256M on CPU, which needs it; the memory fraction on GPU)"
    )
    gpu_memory_utilization: float = Field(0.9, description="GPU only, when kv_cache_bytes is unset")
    tensor_parallel_size: int = Field(1, description="GPU only: shards the model across this many GPUs")
    enable_prefix_caching: bool = True
    max_num_seqs: int | None = Field(None, description="vLLM --max-num-seqs (unset = vLLM default)")
    vllm_extra_args: list[str] = Field(default_factory=list, description="appended verbatim to the vLLM command")
    vllm_startup_timeout_s: float = Field(600.0, description="how long to wait for vLLM /health")

    # ---------------------------------------------------------------- adapter manager
    replica: str = Field(default_factory=socket.gethostname, description="replica name: one consumer group per replica (fan-out)")
    adapter_poll_ms: int = Field(1000, description="blocking read on the adapter stream")
    adapter_group_max_idle_s: float = Field(
        86_400, ge=0, description="at start, remove other replicas' adapter groups idle this long (gone pods; 0 = keep all)"
    )

    # ---------------------------------------------------------------- worker (paper 3.2-3.3)
    gateway_url: str | None = Field(
        None,
        description="OpenAI base URL the worker samples from, or several comma-separated (rollout replicas: groups "
        "are spread over them round-robin); unset = http://127.0.0.1:<port>",
    )
    generator_base_url: str | None = Field(None, description="query generator endpoint (unset = the gateway)")
    generator_model: str | None = Field(None, description="query generator model (unset = the current policy)")
    generator_api_key: str | None = Field(None, description="key for the generator endpoint (unset = api_key)")
    seed_queries: Path = Field(Path("data/seed_queries.jsonl"), description="seed set for query generation (3.2)")
    queries_per_iteration: int = Field(8, ge=1, description="K (paper: 250 or 500); a run's RunConfig overrides it")
    responses_per_query: int = Field(8, ge=1, description="m (paper: 8); a run's RunConfig overrides it")
    examples_per_prompt: int = Field(5, description="seed examples per generation prompt (paper: 5)")
    query_lang: Literal["auto", "en", "zh"] = Field("auto", description="generation prompt language (auto = most examples')")
    generation_attempts: int = Field(0, description="generation prompts per iteration before the fallback (0 = 3 x K)")
    generation_temperature: float = 1.0
    generation_max_tokens: int = 1024
    generation_json_list: bool = Field(
        False, description="constrain the generator to a list literal of quoted strings (vLLM structured outputs regex)"
    )
    min_query_chars: int = Field(8, description="shorter generated queries are dropped")
    max_query_chars: int = Field(4000, description="longer generated queries are dropped")
    seed_fallback: bool = Field(
        True, description="fill an iteration the generator left short with unused seed queries (flagged seed_fallback)"
    )
    temperature: float = 1.0
    top_p: float = Field(0.95, description="top-p of the m responses (paper 3.3)")
    max_tokens: int | None = Field(
        None,
        ge=1,
        description="fixed cap on a response, in tokens; unset = the served window minus the prompt, per request "
        "(a cap under the documents' length would cut the long answers eq. 5 rewards and train them as negatives)",
    )
    seed: int | None = Field(0, description="base sampling seed (unset = random); each group derives its own")
    concurrency: int = Field(32, description="queries sampled at once (each one request with n = m)")
    request_timeout_s: float = 3600.0
