"""What this machine's matmul reaches: the bound the benches and ``grace plan`` compare with."""

from __future__ import annotations

import statistics
import time

import torch


def matmul_flops_per_s(dtype: torch.dtype, shape: tuple[int, int, int], seconds: float = 2.0) -> float:
    """Median torch matmul throughput in ``dtype`` for (m x k) @ (k x n) products over ``seconds``.

    The median, not the best: on a shared machine the measured run sees the
    average contention, and so should the bound it is compared with.
    """
    m, k, n = shape
    a = torch.randn(m, k).to(dtype)
    b = torch.randn(k, n).to(dtype)
    torch.matmul(a, b)
    rates, deadline = [], time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(rates) < 3:
        start = time.perf_counter()
        torch.matmul(a, b)
        rates.append(2 * m * k * n / (time.perf_counter() - start))
    return statistics.median(rates)
