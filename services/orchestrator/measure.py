"""Constants of this machine for `grace plan --measure-cpu`: matmul FLOP/s and memory bandwidth.

The plan's GPU constants come from datasheets; on a CPU they can be measured,
so the plan of the tiny set can be checked against the demo on the same machine.
"""

from __future__ import annotations

import os
import statistics
import time

from services.orchestrator.plan import Device

# Efficiency fractions on this CPU, relative to the *measured* bounds below:
# - prefill: `grace bench reward` on the small set measured the scorer at 0.30 of the bf16 matmul bound
#   (0.76 in fp32) on this project's 2-core machines (README, Benchmarks);
# - training: no bench measures it; assumed 0.50 in fp32 (between the scorer's bf16 and fp32 forward
#   fractions: the backward adds small unfused PEFT ops) and 0.30 in bf16;
# - decode: vLLM's CPU build on the tiny model is bound by per-token work (sampling, detokenising,
#   streaming), not by bandwidth: DESIGN.md section 4 measured ~1300 tok/s with n=4 (3.1 ms per step of 4
#   sequences); `grace bench rollout --presets tiny --queries 8 --responses 8 --min-tokens 250
#   --max-tokens 350 --repeats 1` measured 1313 (raw vLLM) and 1582 (service) tok/s with 64 sequences,
#   i.e. ~44 ms per step of 64. Solving a + 4 b = 3.1 ms, a + 64 b = 44 ms: a = 0.4 ms per step,
#   b = 0.65 ms per sequence per step. The copy bandwidth itself is the achievable bound (utilisation 1.0).
CPU_PREFILL_MFU = 0.30
CPU_PREFILL_MFU_FP32 = 0.76
CPU_TRAIN_MFU = 0.30
CPU_TRAIN_MFU_FP32 = 0.50
# vLLM's CPU KV cache: the rollout service passes --kv-cache-memory-bytes 256M on CPU (services/rollout/config.py)
CPU_KV_CACHE_BYTES = 256 * 2**20
CPU_DECODE_STEP_OVERHEAD_S = 0.4e-3
CPU_DECODE_SEQ_OVERHEAD_S = 0.65e-3


def copy_bandwidth(megabytes: int = 256, seconds: float = 1.0) -> float:
    """Median bytes/s of copying a large fp32 tensor (read + write counted: 2 x size per copy)."""
    import torch

    src = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    rates, deadline = [], time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(rates) < 3:
        start = time.perf_counter()
        dst.copy_(src)
        rates.append(2 * src.numel() * 4 / (time.perf_counter() - start))
    return statistics.median(rates)


def memory_bytes() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30


def cpu_device(shape: tuple[int, int, int] = (1024, 1024, 1024), seconds: float = 1.0) -> tuple[Device, dict[str, float]]:
    """This CPU as a plan device: matmul FLOP/s at ``shape`` (bf16 and fp32) and copy bandwidth, measured now."""
    import torch

    from shared.throughput import matmul_flops_per_s

    bf16 = matmul_flops_per_s(torch.bfloat16, shape, seconds)
    fp32 = matmul_flops_per_s(torch.float32, shape, seconds)
    bandwidth = copy_bandwidth(seconds=seconds)
    measured = {"matmul_bf16_gflop_s": bf16 / 1e9, "matmul_fp32_gflop_s": fp32 / 1e9, "copy_gb_s": bandwidth / 1e9,
                "threads": float(torch.get_num_threads()), "shape": list(shape)}  # fmt: skip
    device = Device(
        name=f"this CPU ({torch.get_num_threads()} threads)", peak_flops=bf16, bandwidth=bandwidth, memory=memory_bytes(),
        prefill_mfu=CPU_PREFILL_MFU, train_mfu=CPU_TRAIN_MFU, decode_bw_util=1.0,
        decode_step_overhead_s=CPU_DECODE_STEP_OVERHEAD_S, decode_seq_overhead_s=CPU_DECODE_SEQ_OVERHEAD_S,
        peak_flops_fp32=fp32, prefill_mfu_fp32=CPU_PREFILL_MFU_FP32, train_mfu_fp32=CPU_TRAIN_MFU_FP32, kind="cpu",
    )  # fmt: skip
    return device, measured
