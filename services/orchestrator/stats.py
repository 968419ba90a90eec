"""Statistics of `grace experiment`: pure functions, no I/O.

- mean ± 95% CI over seeds: Student's t-interval, mean ± t(0.975, S-1) * sd / sqrt(S)
  (sd with S-1 in the denominator); with one seed the interval has zero width;
- per-column rank among methods on the seed means (rank 1 = best, higher is
  better for L, E, P, Rs, Rd; ties share the average rank; a missing value ranks
  last), the average rank over the five columns, and the % gain over the
  ``sft`` baseline row;
- a paired comparison of two methods (grace vs kto) over units = (seed, held-out
  query): per unit, each metric's mean over the query's parsed samples, and each
  method's average rank among all methods of the experiment on that unit; the
  difference a - b per unit is tested with a two-sided sign-flip permutation
  test (exact over all 2^n sign patterns up to ``EXACT_MAX`` units, else
  ``resamples`` random patterns with the (count + 1) / (resamples + 1) estimate).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence

from services.orchestrator.report import average_ranks, improvement, ranks

# short name -> key in the reward service's metrics and the eval summaries
METRICS = {"L": "length", "E": "diversity", "P": "professionalism", "Rs": "relevance_summary", "Rd": "relevance_document"}
EXACT_MAX = 16

# two-sided 95%: t quantile 0.975 for df = 1..30
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t975(df: int) -> float:
    """Student's t 0.975 quantile (table to df 30, then the Cornish-Fisher expansion around 1.96)."""
    if df < 1:
        raise ValueError("df must be >= 1")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def _present(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]


def mean_ci(values: Sequence[float | None]) -> tuple[float | None, float | None, float | None]:
    """(mean, lo, hi) of the present values: the 95% t-interval; (None, None, None) if none."""
    xs = _present(values)
    if not xs:
        return None, None, None
    mean = sum(xs) / len(xs)
    if len(xs) == 1:
        return mean, mean, mean
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
    half = t975(len(xs) - 1) * sd / math.sqrt(len(xs))
    return mean, mean - half, mean + half


def method_table(per_seed: Mapping[str, Sequence[Mapping[str, float | None]]], baseline: str = "sft") -> dict:
    """``per_seed[method]``: one summary per seed (long metric keys). Returns per method:
    ``metrics[short] = {mean, ci95: [lo, hi], rank, gain_pct}`` and ``avg_rank``; methods keep their order."""
    methods = list(per_seed)
    out: dict = {m: {"metrics": {}} for m in methods}
    rank_columns = []
    for short, key in METRICS.items():
        means = {}
        for m in methods:
            mean, lo, hi = mean_ci([s.get(key) for s in per_seed[m]])
            means[m] = mean
            out[m]["metrics"][short] = {"mean": mean, "ci95": [lo, hi]}
        column = ranks([means[m] for m in methods], higher_is_better=True)
        rank_columns.append(column)
        for m, r in zip(methods, column):
            out[m]["metrics"][short]["rank"] = r
            base = means.get(baseline) if baseline in means else None
            out[m]["metrics"][short]["gain_pct"] = None if m == baseline else improvement(means[m], base)
    for m, avg in zip(methods, average_ranks(rank_columns)):
        out[m]["avg_rank"] = avg
    return out


def seed_ranks(per_seed: Mapping[str, Sequence[Mapping[str, float | None]]]) -> list[dict[str, float]]:
    """Per seed, each method's average rank among the methods on that seed's values alone (``method_table`` of
    one seed): how often a method leads across seeds, next to the ranks of the seed means."""
    seeds = min((len(v) for v in per_seed.values()), default=0)
    return [{m: t["avg_rank"] for m, t in method_table({m: [v[i]] for m, v in per_seed.items()}).items()}
            for i in range(seeds)]  # fmt: skip


def unit_means(records: Sequence[Mapping], seed: int) -> dict[tuple[int, str], dict[str, float | None]]:
    """Eval records (``responses.jsonl`` rows) -> {(seed, query_id): {short: mean over the parsed samples}}."""
    grouped: dict[str, list[Mapping]] = {}
    for r in records:
        grouped.setdefault(str(r["query_id"]), []).append(r)
    out = {}
    for query_id, rows in grouped.items():
        parsed = [r for r in rows if r.get("parsed") and r.get("metrics")]
        out[(seed, query_id)] = {
            short: (sum(float(r["metrics"][key]) for r in parsed) / len(parsed) if parsed else None)
            for short, key in METRICS.items()
        }
    return out


def unit_average_ranks(units: Mapping[str, Mapping[tuple, Mapping[str, float | None]]]) -> dict[str, dict[tuple, float]]:
    """``units[method][unit][short]`` -> per method, per unit present for every method, its average rank
    over the five metrics among the methods on that unit (missing values rank last)."""
    methods = list(units)
    common = set.intersection(*(set(units[m]) for m in methods)) if methods else set()
    out: dict[str, dict[tuple, float]] = {m: {} for m in methods}
    for unit in sorted(common):
        columns = [ranks([units[m][unit].get(short) for m in methods]) for short in METRICS]
        for m, avg in zip(methods, average_ranks(columns)):
            out[m][unit] = avg
    return out


def sign_flip_p(diffs: Sequence[float], resamples: int = 10000, seed: int = 0) -> float:
    """Two-sided p of mean(diffs) = 0 under random signs (paired permutation test).

    Exact for n <= EXACT_MAX: the share of the 2^n sign patterns whose |mean| is at least the
    observed one; otherwise Monte Carlo. No units, or all zero: 1.0.
    """
    xs = [float(d) for d in diffs]
    n = len(xs)
    if n == 0:
        return 1.0
    observed = abs(sum(xs)) - 1e-12 * max(1.0, sum(abs(x) for x in xs))  # float ties count as extreme
    if n <= EXACT_MAX:
        hits = 0
        for pattern in range(2**n):
            total = sum(-x if pattern >> i & 1 else x for i, x in enumerate(xs))
            hits += abs(total) >= observed
        return hits / 2**n
    rng = random.Random(seed)
    hits = 0
    for _ in range(resamples):
        total = sum(x if rng.random() < 0.5 else -x for x in xs)
        hits += abs(total) >= observed
    return (hits + 1) / (resamples + 1)


def paired_comparison(units: Mapping[str, Mapping[tuple, Mapping[str, float | None]]], a: str, b: str) -> dict:
    """``a`` vs ``b`` over their common (seed, query) units: per metric and on the per-unit average rank,
    the mean difference a - b, the number of units and the sign-flip p-value. For the average rank a
    negative difference favours ``a`` (rank 1 = best)."""
    out: dict = {"metrics": {}}
    for short in METRICS:
        diffs = [
            units[a][u][short] - units[b][u][short]
            for u in sorted(set(units[a]) & set(units[b]))
            if units[a][u].get(short) is not None and units[b][u].get(short) is not None
        ]
        out["metrics"][short] = {"mean_diff": sum(diffs) / len(diffs) if diffs else None, "units": len(diffs),
                                 "p_value": sign_flip_p(diffs)}  # fmt: skip
    avg = unit_average_ranks(units)
    diffs = [avg[a][u] - avg[b][u] for u in sorted(avg[a])]
    out["avg_rank"] = {"mean_diff": sum(diffs) / len(diffs) if diffs else None, "units": len(diffs),
                       "p_value": sign_flip_p(diffs)}  # fmt: skip
    return out
