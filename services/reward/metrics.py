"""The per-response metrics of paper 3.3 / appendix A as pure math (no models, no I/O).

``scorer.py`` runs the models and calls these on their outputs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# eq. 4: (dense, lexical, multi-vector) weights; plain weighted sums, not
# FlagEmbedding's compute_score, which divides by the sum of the weights.
SUMMARY_WEIGHTS = (1.0, 0.3, 1.0)
DOCUMENT_WEIGHTS = (0.15, 0.5, 0.35)


def diversity(tokens: Sequence[int], n: int = 2) -> float:
    """E (eq. 2): unique token n-grams / all token n-grams x 100; 0 when the text has no n-gram."""
    total = len(tokens) - n + 1
    if total <= 0:
        return 0.0
    unique = len({tuple(tokens[i : i + n]) for i in range(total)})
    return unique / total * 100.0


def perplexity(nll_sum: float, count: int) -> float:
    """exp(mean negative log-likelihood) over ``count`` predicted tokens."""
    if count <= 0:
        raise ValueError("perplexity needs at least one predicted token")
    return math.exp(nll_sum / count)


@dataclass(frozen=True)
class Window:
    """One forward pass over ``ids[begin:end]`` that scores positions ``[target_start, end)``."""

    begin: int
    end: int
    target_start: int


def sliding_windows(n: int, window: int, stride: int) -> list[Window]:
    """Strided sliding windows over ``n`` tokens (position 0 is context only).

    Every position 1..n-1 is scored exactly once, each with at least
    ``window - stride`` tokens of context once past the first window, as in
    the Hugging Face fixed-length perplexity recipe; nothing is truncated.
    """
    if window < 2 or not 0 < stride < window:
        raise ValueError(f"need window >= 2 and 0 < stride < window, got window={window} stride={stride}")
    spans: list[Window] = []
    prev_end = 1
    begin = 0
    while prev_end < n:
        end = min(begin + window, n)
        spans.append(Window(begin, end, max(prev_end, begin + 1)))
        prev_end = end
        begin += stride
    return spans


def dense_score(q: torch.Tensor, p: torch.Tensor) -> float:
    """r_dense (eq. 13): inner product of the L2-normalized [CLS] states."""
    return float(F.normalize(q.float(), dim=-1) @ F.normalize(p.float(), dim=-1))


def token_weights(ids: Iterable[int], weights: Iterable[float], skip: set[int]) -> dict[int, float]:
    """Lexical term weights (eq. 14): max ReLU weight per token id, special tokens skipped."""
    out: dict[int, float] = {}
    for token, w in zip(ids, weights):
        if token in skip or w <= 0:
            continue
        if w > out.get(token, 0.0):
            out[token] = float(w)
    return out


def lexical_score(q: dict[int, float], p: dict[int, float]) -> float:
    """r_lex (eq. 14): sum over shared terms of w_q * w_p."""
    if len(p) < len(q):
        q, p = p, q
    return sum(w * p[t] for t, w in q.items() if t in p)


def colbert_score(q_vecs: torch.Tensor, p_vecs: torch.Tensor) -> float:
    """r_mul (eq. 15): mean over query vectors of the best passage-vector match (vectors L2-normalized)."""
    if q_vecs.shape[0] == 0 or p_vecs.shape[0] == 0:
        return 0.0
    q = F.normalize(q_vecs.float(), dim=-1)
    p = F.normalize(p_vecs.float(), dim=-1)
    return float((q @ p.T).max(dim=1).values.mean())


def relevance(dense: float, lexical: float, multi: float, weights: tuple[float, float, float]) -> float:
    """Rs / Rd (eq. 4): plain weighted sum of the three BGE-M3 similarities."""
    return weights[0] * dense + weights[1] * lexical + weights[2] * multi
