"""Rank-sum (eq. 5), group calibration (eq. 6-7) and global normalization (eq. 8-9).

Pure functions over plain numbers. Rank sums and group statistics are
computed with exact fractions, so equal rank sums give a deviation of exactly
0 and float noise can never move a sample between Omega+ and Omega-.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal, Protocol

# eq. 5: (metric attribute, weight, higher_is_better); rank 1 = best.
RANK_TERMS: tuple[tuple[str, str, bool], ...] = (
    ("length", "1", True),
    ("diversity", "1", True),
    ("professionalism", "1", True),
    ("relevance_document", "0.8", True),
    ("relevance_summary", "0.2", True),
    ("domain_perplexity", "1", False),  # rho_(-PD): lower domain perplexity is better
)
ZERO_TOLERANCE = 1e-9  # |Z| below this is 0, i.e. in Omega+
UNPARSED_WEIGHT = -1.0


class MetricValues(Protocol):
    length: float
    diversity: float
    professionalism: float
    general_perplexity: float
    domain_perplexity: float
    relevance_summary: float
    relevance_document: float


@dataclass(frozen=True)
class Calibrated:
    """One response after calibration; ``rank_sum`` and ``z`` are None when unparsed."""

    parsed: bool
    rank_sum: float | None
    z: float | None
    weight: float

    @property
    def desirable(self) -> bool:
        """Membership of Omega+ (Z >= 0); unparsed responses are undesirable."""
        return self.parsed and self.z is not None and self.z >= 0


def average_ranks(values: Sequence[float], higher_is_better: bool = True) -> list[Fraction]:
    """Rank 1 = best; tied values share the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i], reverse=higher_is_better)
    ranks: list[Fraction] = [Fraction(0)] * len(values)
    start = 0
    while start < len(order):
        stop = start
        while stop + 1 < len(order) and values[order[stop + 1]] == values[order[start]]:
            stop += 1
        shared = Fraction(start + 1 + stop + 1, 2)
        for k in range(start, stop + 1):
            ranks[order[k]] = shared
        start = stop + 1
    return ranks


def _rank_sums_exact(metrics: Sequence[MetricValues]) -> list[Fraction]:
    totals = [Fraction(0)] * len(metrics)
    for attr, weight, higher in RANK_TERMS:
        values = [float(getattr(m, attr)) for m in metrics]
        if any(math.isnan(v) for v in values):
            raise ValueError(f"metric {attr} is NaN")
        for i, rank in enumerate(average_ranks(values, higher)):
            totals[i] += Fraction(weight) * rank
    return totals


def rank_sum(metrics: Sequence[MetricValues]) -> list[float]:
    """rho_total (eq. 5) of each parsed response of one group."""
    return [float(r) for r in _rank_sums_exact(metrics)]


def _group_z_exact(rank_sums: Sequence[Fraction]) -> list[float]:
    m = len(rank_sums)
    if m == 0:
        return []
    neg = [-r for r in rank_sums]  # polarity inversion: lower rank sum = better
    mean = sum(neg, Fraction(0)) / m
    var = sum(((x - mean) ** 2 for x in neg), Fraction(0)) / m  # population variance (eq. 7)
    if var == 0:
        return [0.0] * m
    std = math.sqrt(var)
    out = []
    for x in neg:
        z = float(x - mean) / std  # eq. 6
        out.append(0.0 if abs(z) < ZERO_TOLERANCE else z)
    return out


def group_z(rank_sums: Sequence[float]) -> list[float]:
    """Z (eq. 6-7) of one group from its rank sums; all 0 when the group's std is 0.

    Float inputs are read to 9 decimals (rank sums are half-integers times the
    eq. 5 weights), so 0.1 + 0.2 and 0.3 count as the same rank sum.
    """
    return _group_z_exact([Fraction(repr(round(float(r), 9))) for r in rank_sums])


def global_normalize(zs: Sequence[float]) -> list[float]:
    """W (eq. 8-9) over the whole dataset: Omega+ sums to |Omega+|, Omega- to -|Omega-|."""
    pos = [z for z in zs if z >= 0]
    neg = [z for z in zs if z < 0]
    pos_sum, neg_sum = math.fsum(pos), math.fsum(neg)
    out = []
    for z in zs:
        if z >= 0:
            out.append(z / pos_sum * len(pos) if pos_sum > 0 else 0.0)  # eq. 8
        else:
            out.append(-z / neg_sum * len(neg))  # eq. 9 (neg_sum < 0 here)
    return out


DegenerateGroups = Literal["omega_plus", "exclude"]


def _is_degenerate(rank_sums: Sequence[Fraction]) -> bool:
    """Fewer than 2 parsed responses, or every rank sum equal (std of -rho is 0)."""
    return len(rank_sums) < 2 or all(r == rank_sums[0] for r in rank_sums)


def degenerate_group_count(groups: Sequence[Sequence[MetricValues | None]]) -> int:
    """Groups with fewer than 2 parsed responses or all rank sums tied (their members' Z is 0).

    A group with no parsed response at all counts too: it carries no ranking signal.
    """
    return sum(_is_degenerate(_rank_sums_exact([m for m in g if m is not None])) for g in groups)


def calibrate(
    groups: Sequence[Sequence[MetricValues | None]], *, degenerate_groups: DegenerateGroups = "omega_plus"
) -> list[list[Calibrated]]:
    """Rank-sum, group Z and global W for a dataset of groups; None = unparsed (W = -1).

    ``degenerate_groups``: a group with fewer than 2 parsed responses or all rank
    sums tied gives its parsed members Z = 0. "omega_plus" (eq. 8 literally)
    counts them in |Omega+|, which raises every other positive weight; "exclude"
    gives them W = 0 and leaves them out of |Omega+| and the sums, so the other
    weights equal those of the dataset without that group.
    """
    if degenerate_groups not in ("omega_plus", "exclude"):
        raise ValueError(f"degenerate_groups must be 'omega_plus' or 'exclude', not {degenerate_groups!r}")
    per_group: list[tuple[list[int], list[Fraction], list[float], bool]] = []
    all_z: list[float] = []
    for group in groups:
        idx = [i for i, m in enumerate(group) if m is not None]
        sums = _rank_sums_exact([group[i] for i in idx])
        zs = _group_z_exact(sums)
        skip = degenerate_groups == "exclude" and _is_degenerate(sums)
        per_group.append((idx, sums, zs, skip))
        if not skip:
            all_z.extend(zs)
    weights = iter(global_normalize(all_z))
    out: list[list[Calibrated]] = []
    for group, (idx, sums, zs, skip) in zip(groups, per_group):
        results = [Calibrated(False, None, None, UNPARSED_WEIGHT) for _ in group]
        for i, s, z in zip(idx, sums, zs):
            results[i] = Calibrated(True, float(s), z, 0.0 if skip else next(weights))
        out.append(results)
    return out
