"""Where a model runs and in which float type: one answer for the reward, the trainer, the context study and
the rollout (which only needs to know whether CUDA is there, for vLLM's flags)."""

from pathlib import Path

import torch


def cuda_available() -> bool:
    """Whether CUDA is there, without creating a CUDA context here (vLLM, started next, wants the memory)."""
    return torch.cuda.is_available()


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: the current CUDA device (the rank's, under a launcher), else the CPU; other names as torch's."""
    if name != "auto":
        return torch.device(name)
    return torch.device("cuda", torch.cuda.current_device()) if cuda_available() else torch.device("cpu")


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmul is then ~2x fp32 on CPU."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device, *, cpu_bf16: bool = True) -> torch.dtype:
    """``fp32``, ``bf16``, or ``auto``: bf16 on CUDA (fp16 on a GPU without it); on CPU bf16 if ``cpu_bf16`` and the
    CPU has native bf16 matmul, else fp32 (the trainer's AdamW, and the context study's 6-digit perplexities)."""
    if name == "fp32":
        return torch.float32
    if name == "bf16":
        return torch.bfloat16
    if name != "auto":
        raise ValueError(f"unknown dtype {name!r}: use auto, bf16 or fp32")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_bf16 and cpu_has_native_bf16() else torch.float32
