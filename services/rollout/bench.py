"""`grace bench rollout`: the service's own overhead, vLLM vs transformers, hot-swap latency.

All figures come from one run, per local model preset (tiny, small):

(a) generated tokens/s of a rollout workload (K queries x m responses of
    varied length, ``ignore_eos`` so every response has its target length)
    through the service (gateway, model ``policy`` = a loaded LoRA adapter) vs
    the same requests sent straight to vLLM under the adapter's versioned name:
    ``overhead_ratio_vs_vllm`` = service tok/s / raw vLLM tok/s (goal >= 0.95);
(b) the same workload through plain transformers ``generate`` (adapter merged,
    same dtype and CPU threads as vLLM's worker, one padded batch: K x m sequences to the longest target;
    only target tokens count): ``speedup_vs_transformers`` = service / transformers;
(c) hot-swap latency: adapter event published -> first response served by the
    new version through `policy` (goal <= 2 s).

The service and vLLM passes run in adjacent pairs (order alternating) and the
ratio is the median of the pair ratios, so the CPU noise of a shared machine
hits both alike. Results: ``bench.json``,
``bench.md`` (table) and ``bench.png`` in ``out_dir``; the last stdout line is
the JSON summary (headline figures from the last preset).
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from shared.bench_report import save_figure, write_json, write_markdown
from shared.cli_options import comma_list, opt

log = logging.getLogger(__name__)

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class BenchConfig:
    presets: tuple[str, ...] = opt(("tiny", "small"), "comma-separated local model presets to measure", cli_type=str,
                                   cli_default="tiny,small", parse=comma_list)  # fmt: skip
    queries: int = opt(8, "K queries of the workload")
    responses: int = opt(4, "m responses per query")
    min_tokens: int = opt(64, "shortest response (tokens)")
    max_tokens: int = opt(256, "longest response (tokens); lengths vary between the two")
    repeats: int = opt(3, "timed (service, raw vLLM) pass pairs; medians count")
    swaps: int = opt(3, cli=False)
    lora_rank: int = opt(8, cli=False)
    out_dir: Path = opt(Path("runs/bench/rollout"), "table, plot and JSON go here")


class RandomLora:
    """Real PEFT LoRA adapters of a base model with random (nonzero) A and B, written through the adapter store."""

    def __init__(self, base_dir: str | Path, adapter_root: str | Path):
        from transformers import AutoModelForCausalLM

        self.base = AutoModelForCausalLM.from_pretrained(base_dir)
        self.store_root = Path(adapter_root)
        self._by_rank: dict[int, object] = {}

    def make(self, version: str, *, rank: int = 8, seed: int = 0, run_id: str = "test", scale: float = 1.0):
        """Writes ``<root>/<run_id>/<version>``; returns (path, checksum, rank)."""
        import torch
        from peft import LoraConfig, get_peft_model

        from shared.adapters import AdapterStore

        model = self._by_rank.get(rank)
        if model is None:
            config = LoraConfig(
                r=rank, lora_alpha=2 * rank, init_lora_weights=False, target_modules=TARGET_MODULES, task_type="CAUSAL_LM"
            )
            model = self._by_rank[rank] = get_peft_model(copy.deepcopy(self.base), config)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.5 * scale)
        path, checksum = AdapterStore(self.store_root).write(run_id, version, model.save_pretrained)
        return path, checksum, rank


@dataclass
class Workload:
    messages: list[list[dict[str, str]]]
    lengths: list[int]  # target response length per query
    m: int

    @property
    def tokens(self) -> int:
        return self.m * sum(self.lengths)


def make_workload(config: BenchConfig) -> Workload:
    from shared.jsonl import read_queries
    from shared.prompts import chat_messages

    queries = read_queries(Path(__file__).resolve().parents[2] / "data" / "test_queries.jsonl")
    picked = [queries[i % len(queries)]["query"] for i in range(config.queries)]
    k = max(config.queries - 1, 1)
    lengths = [round(config.min_tokens + (config.max_tokens - config.min_tokens) * i / k) for i in range(config.queries)]
    return Workload([chat_messages(q) for q in picked], lengths, config.responses)


async def _drive(base_url: str, model: str, api_key: str, workload: Workload, seed: int) -> tuple[float, int]:
    """All queries at once, one request with n = m each; (seconds, completion tokens)."""
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, timeout=1800, max_retries=0)

    async def one(messages, length, index):
        reply = await client.chat.completions.create(
            model=model, messages=messages, n=workload.m, max_tokens=length, temperature=1.0, top_p=0.95,
            seed=seed + 1000 * index, extra_body={"ignore_eos": True},
        )  # fmt: skip
        return reply.usage.completion_tokens

    started = time.perf_counter()
    tokens = await asyncio.gather(*(one(m, n, i) for i, (m, n) in enumerate(zip(workload.messages, workload.lengths))))
    seconds = time.perf_counter() - started
    await client.close()
    return seconds, sum(tokens)


def _swap_latency(service_url: str, api_key: str, redis_client, lora: RandomLora, version: str, seed: int, rank: int) -> float:
    """Seconds from the adapter event to the first `policy` response served by the new version."""
    import httpx

    from shared.schemas import STREAM_ADAPTERS, AdapterEvent
    from shared.streams import publish

    path, checksum, rank = lora.make(version, rank=rank, seed=seed, run_id="bench")
    body = {"model": "policy", "prompt": "Report", "max_tokens": 1}
    headers = {"authorization": f"Bearer {api_key}"}
    with httpx.Client(base_url=service_url, headers=headers, timeout=60) as http:
        started = time.perf_counter()
        event = AdapterEvent(run_id="bench", iteration=seed, version=version, path=str(path), checksum=checksum, rank=rank)
        publish(redis_client, STREAM_ADAPTERS, event)
        while True:
            reply = http.post("/v1/completions", json=body)
            reply.raise_for_status()
            if reply.headers.get("x-grace-adapter-version") == version:
                return time.perf_counter() - started
            if time.perf_counter() - started > 120:
                raise TimeoutError(f"adapter {version} not served after 120 s")


def _transformers_generate(model_dir: Path, adapter_dir: Path, workload: Workload, dtype: str) -> dict:
    """The same workload through plain `generate`: adapter merged, one left-padded batch of K x m sequences."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # the compute vLLM's CPU worker gets: all cores but the one it reserves for its API server
    # (with every core, OpenMP spin-waits against other load and a decode step gets ~50x slower here)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
    model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload().eval()
    prompts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in workload.messages]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    longest = max(workload.lengths)
    torch.manual_seed(0)
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            **batch, do_sample=True, top_p=0.95, temperature=1.0, max_new_tokens=longest, min_new_tokens=longest,
            num_return_sequences=workload.m, pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
    seconds = time.perf_counter() - started
    torch.set_num_threads(threads)
    generated = (out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0]
    return {"seconds": seconds, "useful_tokens": workload.tokens, "generated_tokens": int(generated),
            "tok_s": workload.tokens / seconds, "raw_tok_s": generated / seconds}  # fmt: skip


def bench_preset(preset: str, config: BenchConfig) -> dict:
    import httpx
    import redis

    from shared.local_redis import LocalRedis, free_port
    from shared.process import ServiceProcess
    from shared.tiny_models import ensure_model_set

    models = ensure_model_set(preset)
    workdir = Path(tempfile.mkdtemp(prefix=f"grace-bench-rollout-{preset}-"))
    workload = make_workload(config)
    api_key = "bench"
    result: dict = {"preset": preset, "workload": {"queries": config.queries, "m": config.responses,
                    "lengths": workload.lengths, "tokens": workload.tokens}}  # fmt: skip
    with LocalRedis(appendonly=False) as local_redis:
        port, vllm_port = free_port(), free_port()
        env = {
            "REDIS_URL": local_redis.url, "GRACE_ROLLOUT_ADAPTER_ROOT": str(workdir / "adapters"),
            "GRACE_ROLLOUT_REPLICA": f"bench-{preset}", "GRACE_ROLLOUT_API_KEY": api_key,
            "GRACE_ROLLOUT_POLICY_MODEL": str(models.policy), "GRACE_ROLLOUT_VLLM_PORT": str(vllm_port),
            "GRACE_ROLLOUT_MAX_LORA_RANK": str(max(16, config.lora_rank)), "GRACE_ROLLOUT_ADAPTER_POLL_MS": "200",
            "PYTHONUNBUFFERED": "1",
        }  # fmt: skip
        command = [sys.executable, "-m", "shared.cli", "serve", "rollout", "--host", "127.0.0.1", "--port", str(port)]
        service = ServiceProcess("rollout", command, workdir / "serve.log", health_url=f"http://127.0.0.1:{port}/health", env=env)
        service_url, vllm_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{vllm_port}"
        started = time.perf_counter()
        service.start()
        client = redis.Redis.from_url(local_redis.url)
        try:
            service.wait_healthy(timeout=900)
            result["startup_s"] = time.perf_counter() - started
            while not client.exists("grace:adapters") or not client.xinfo_groups("grace:adapters"):
                time.sleep(0.2)  # the adapter manager's consumer group
            lora = RandomLora(models.policy, workdir / "adapters")
            swaps = [
                _swap_latency(service_url, api_key, client, lora, f"swap-{i}", i + 1, config.lora_rank)
                for i in range(config.swaps)
            ]
            result["swap_latency_s"] = {"median": statistics.median(swaps), "max": max(swaps), "all": swaps}
            admin = httpx.get(service_url + "/admin/adapters", headers={"authorization": f"Bearer {api_key}"}).json()
            adapter_model, adapter_path = admin["current"]["model"], admin["current"]["path"]

            asyncio.run(_drive(service_url + "/v1", "policy", api_key, workload, seed=1))  # warm-up both paths
            asyncio.run(_drive(vllm_url + "/v1", adapter_model, "none", workload, seed=1))
            rates: dict[str, list[float]] = {"service": [], "vllm": []}
            for r in range(config.repeats):  # adjacent pairs, order alternating: drift on a shared machine cancels
                order = [("service", service_url, "policy", api_key), ("vllm", vllm_url, adapter_model, "none")]
                for name, url, model, key in order if r % 2 == 0 else order[::-1]:
                    seconds, tokens = asyncio.run(_drive(url + "/v1", model, key, workload, seed=100 + r))
                    rates[name].append(tokens / seconds)
            for name, values in rates.items():
                result[name] = {"tok_s": statistics.median(values), "all_tok_s": values}
            result["pair_ratios"] = [a / b for a, b in zip(rates["service"], rates["vllm"])]
        finally:
            client.close()
            service.stop()
    result["transformers"] = _transformers_generate(Path(models.policy), Path(adapter_path), workload, "bfloat16")
    result["overhead_ratio_vs_vllm"] = statistics.median(result["pair_ratios"])
    result["speedup_vs_transformers"] = result["service"]["tok_s"] / result["transformers"]["tok_s"]
    shutil.rmtree(workdir, ignore_errors=True)
    return result


def _report(results: list[dict], out_dir: Path) -> None:
    write_json(out_dir / "bench.json", results)
    systems = ["service", "vllm", "transformers"]
    header = ["preset", "service tok/s", "raw vLLM tok/s", "transformers tok/s", "overhead ratio"]
    header += ["speedup vs transformers", "swap median s", "swap max s"]
    rows = [
        [r["preset"], *(f"{r[system]['tok_s']:.0f}" for system in systems), f"{r['overhead_ratio_vs_vllm']:.3f}"]
        + [f"{r['speedup_vs_transformers']:.2f}", *(f"{r['swap_latency_s'][k]:.3f}" for k in ("median", "max"))]
        for r in results
    ]
    print(write_markdown(out_dir / "bench.md", header, rows))

    def draw(ax) -> None:
        width = 0.25
        for j, system in enumerate(systems):
            ax.bar([i + j * width for i in range(len(results))], [r[system]["tok_s"] for r in results], width, label=system)
        ax.set_xticks([i + width for i in range(len(results))], [r["preset"] for r in results])
        ax.set_ylabel("generated tokens/s")
        ax.set_title("rollout workload (K x m, varied length)")
        ax.legend()

    save_figure(out_dir / "bench.png", draw)


def run_bench(config: BenchConfig) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for name in ("httpx", "httpx2"):  # one INFO line per request otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    results = []
    for preset in config.presets:
        log.info("event=bench_preset_start preset=%s", preset)
        results.append(bench_preset(preset, config))
        log.info("event=bench_preset_done preset=%s result=%s", preset, json.dumps(results[-1]))
    _report(results, config.out_dir)
    headline = results[-1]
    summary = {
        "overhead_ratio_vs_vllm": round(headline["overhead_ratio_vs_vllm"], 4),
        "speedup_vs_transformers": round(headline["speedup_vs_transformers"], 4),
        "swap_latency_s": round(headline["swap_latency_s"]["max"], 4),
        "headline_preset": headline["preset"],
        "presets": {
            r["preset"]: {
                "service_tok_s": round(r["service"]["tok_s"], 1), "vllm_tok_s": round(r["vllm"]["tok_s"], 1),
                "transformers_tok_s": round(r["transformers"]["tok_s"], 1),
                "overhead_ratio_vs_vllm": round(r["overhead_ratio_vs_vllm"], 4),
                "speedup_vs_transformers": round(r["speedup_vs_transformers"], 4),
                "swap_latency_s_median": round(r["swap_latency_s"]["median"], 4),
                "swap_latency_s_max": round(r["swap_latency_s"]["max"], 4),
            }
            for r in results
        },
    }  # fmt: skip
    print(json.dumps(summary))
    return summary
