"""Result tables and z-score plots in the paper's layout. Pure except ``plot_zscores``.

- Tables 1/2/4: one row per method, each value followed by its rank in the
  column "(1)" = best, an average-rank column, and a last row with the best
  method's improvement over the first (baseline) row.
- Table 3: perplexity and generated tokens per context-extension method and window.
- Figures 1/3: every metric z-normalized across methods (bars) or stages (lines).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

Value = float | None


@dataclass(frozen=True)
class Column:
    key: str
    title: str
    higher_is_better: bool = True
    digits: int = 3


# Table 1 / 4 (automatic metrics, paper 3.3) and Table 2 (LLM judge, appendix E).
AUTOMATIC_COLUMNS = (
    Column("length", "L", digits=1),
    Column("diversity", "E", digits=2),
    Column("professionalism", "P", digits=3),
    Column("relevance_summary", "Rs", digits=3),
    Column("relevance_document", "Rd", digits=3),
)
JUDGE_COLUMNS = (
    Column("content_accuracy_relevance", "CAR", digits=2),
    Column("tone_formality", "TF", digits=2),
    Column("idea_development_argumentation", "IDA", digits=2),
    Column("structure_clarity", "SC", digits=2),
    Column("persuasiveness_effectiveness", "PE", digits=2),
)
LONG_NAMES = {
    "L": "Content Length", "E": "Expression Diversity", "P": "Professionalism",
    "Rs": "Summary-Level Relevance", "Rd": "Document-Level Relevance",
    "CAR": "Content Accuracy & Relevance", "TF": "Tone & Formality", "IDA": "Idea Development & Argumentation",
    "SC": "Structure & Clarity", "PE": "Persuasiveness & Effectiveness",
}  # fmt: skip


def _missing(value: Value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def ranks(values: Sequence[Value], higher_is_better: bool = True) -> list[float]:
    """Rank 1 = best; tied values share the average of their ranks; missing values rank last (tied)."""
    present = sorted(
        (i for i, v in enumerate(values) if not _missing(v)),
        key=lambda i: -values[i] if higher_is_better else values[i],
    )
    order = present + [i for i, v in enumerate(values) if _missing(v)]
    out = [0.0] * len(values)
    pos = 0
    while pos < len(order):
        end = pos
        while end + 1 < len(order) and _same(values[order[end + 1]], values[order[pos]]):
            end += 1
        shared = (pos + end) / 2 + 1  # average of ranks pos+1 .. end+1
        for k in range(pos, end + 1):
            out[order[k]] = shared
        pos = end + 1
    return out


def _same(a: Value, b: Value) -> bool:
    if _missing(a) or _missing(b):
        return _missing(a) and _missing(b)
    return a == b


def average_ranks(rank_columns: Sequence[Sequence[float]]) -> list[float]:
    """Per row, the mean of its ranks over the columns (the paper's "Avg. Rank")."""
    if not rank_columns:
        return []
    rows = len(rank_columns[0])
    return [sum(col[r] for col in rank_columns) / len(rank_columns) for r in range(rows)]


def zscores(values: Sequence[Value]) -> list[Value]:
    """(x - mean) / population std over the present values; all 0 when std is 0; missing stay None."""
    present = [v for v in values if not _missing(v)]
    if not present:
        return [None] * len(values)
    mean = sum(present) / len(present)
    std = math.sqrt(sum((v - mean) ** 2 for v in present) / len(present))
    return [None if _missing(v) else (0.0 if std == 0 else (v - mean) / std) for v in values]


def improvement(value: Value, baseline: Value) -> float | None:
    """Relative change in percent, as in Table 1's last row; None if undefined."""
    if _missing(value) or _missing(baseline) or baseline == 0:
        return None
    return (value - baseline) / abs(baseline) * 100


def _fmt(value: Value, digits: int) -> str:
    return "-" if _missing(value) else f"{value:.{digits}f}"


def _fmt_rank(rank: float) -> str:
    return f"{rank:.0f}" if rank == int(rank) else f"{rank:.1f}"


def rank_table(
    methods: Sequence[str],
    values: Mapping[str, Mapping[str, Value]],
    columns: Sequence[Column],
    *,
    method_title: str = "Method",
    average_title: str | None = None,
    unranked: Sequence[str] = (),
    improvement_row: bool = True,
) -> str:
    """A markdown table like the paper's Tables 1, 2 and 4.

    ``values[method][column.key]``. ``average_title`` adds the mean of the row's
    values (Table 2's "Avg."). Methods in ``unranked`` (e.g. a labeled answer)
    are shown without ranks and take no part in the others' ranks.
    """
    ranked = [m for m in methods if m not in unranked]
    col_ranks = {c.key: dict(zip(ranked, ranks([values[m].get(c.key) for m in ranked], c.higher_is_better))) for c in columns}
    avg_rank = dict(zip(ranked, average_ranks([[col_ranks[c.key][m] for m in ranked] for c in columns])))
    header = [method_title] + [c.title for c in columns] + ([average_title] if average_title else []) + ["Avg. Rank"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + [":---:"] * (len(header) - 1)) + "|"]
    for method in methods:
        cells = [method]
        for c in columns:
            cell = _fmt(values[method].get(c.key), c.digits)
            if method in avg_rank:
                cell += f" ({_fmt_rank(col_ranks[c.key][method])})"
            cells.append(cell)
        if average_title:
            row = [values[method].get(c.key) for c in columns]
            mean = None if any(_missing(v) for v in row) else sum(row) / len(row)
            cells.append(_fmt(mean, max(c.digits for c in columns)))
        cells.append(f"{avg_rank[method]:.1f}" if method in avg_rank else "-")
        lines.append("| " + " | ".join(cells) + " |")
    if improvement_row and len(ranked) >= 2:
        best = min(ranked, key=lambda m: (avg_rank[m], ranked.index(m)))
        baseline = ranked[0]
        changes = [improvement(values[best].get(c.key), values[baseline].get(c.key)) for c in columns]
        if best != baseline and any(change is not None for change in changes):
            cells = [f"{best} vs {baseline}"] + ["-" if ch is None else f"{ch:+.1f}%" for ch in changes]
            cells += [""] * (len(header) - len(cells))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def zscore_matrix(
    methods: Sequence[str], values: Mapping[str, Mapping[str, Value]], columns: Sequence[Column]
) -> dict[str, list[Value]]:
    """Column title -> z-scores across methods; lower-is-better columns are negated (up = better)."""
    out = {}
    for c in columns:
        z = zscores([values[m].get(c.key) for m in methods])
        out[c.title] = z if c.higher_is_better else [None if v is None else -v for v in z]
    return out


def context_table(results: Sequence[Mapping], factors: Sequence[float], native_window: int) -> str:
    """Table 3: rows = methods, per window a PPL and a #Tokens column.

    ``results``: dicts with keys method, factor, ppl, tokens (None = not run / out of memory).
    """
    methods = list(dict.fromkeys(r["method"] for r in results))
    cell = {(r["method"], r["factor"]): r for r in results}
    head = ["Extension Method"]
    for f in factors:
        head += [f"PPL {_window(native_window * f)} ({f:g}x)", f"#Tokens {_window(native_window * f)} ({f:g}x)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + [":---:"] * (len(head) - 1)) + "|"]
    for m in methods:
        cells = [m]
        for f in factors:
            r = cell.get((m, f), {})
            error = r.get("error")
            cells.append(error or _fmt(r.get("ppl"), 3))
            cells.append(error or _fmt(r.get("tokens"), 1))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _window(tokens: float) -> str:
    tokens = int(tokens)
    return f"{tokens // 1024}k" if tokens % 1024 == 0 else str(tokens)


def plot_zscores(
    path: str | Path,
    labels: Sequence[str],
    series: Mapping[str, Sequence[Value]],
    *,
    style: str = "bars",
    title: str = "Z-score Normalized Metrics",
    xlabel: str = "Training Progress",
) -> Path:
    """Figure 1 (``bars``: metrics on x, one bar per method) or figure 3 (``lines``: stages on x).

    ``series``: metric title -> z-score per label (None = missing, left out).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(series) + 2), 4.5))
    if style == "lines":
        for metric, zs in series.items():
            xs = [i for i, z in enumerate(zs) if z is not None]
            ax.plot(xs, [zs[i] for i in xs], marker="o", label=LONG_NAMES.get(metric, metric))
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel(xlabel)
        ax.legend(title="Metrics", fontsize=8)
    else:
        metrics = list(series)
        width = 0.8 / max(1, len(labels))
        for j, label in enumerate(labels):
            xs = [i + (j - (len(labels) - 1) / 2) * width for i in range(len(metrics))]
            heights = [series[m][j] if series[m][j] is not None else 0.0 for m in metrics]
            ax.bar(xs, heights, width=width, label=label)
        ax.set_xticks(range(len(metrics)), metrics)
        ax.legend(title="Methods", fontsize=8)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_ylabel("Z-score")
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(records: Sequence[Mapping]) -> dict:
    """One policy's evaluation records -> the values of its table rows.

    Automatic metrics are means over parsed responses (unparsed ones have none);
    judge criteria are means over judged responses x 10 (Table 2's 0-100 scale).
    """
    parsed = [r for r in records if r.get("parsed") and r.get("metrics")]
    judged = [r for r in records if r.get("judge")]
    out: dict = {
        "responses": len(records),
        "parsed": len(parsed),
        "parse_rate": len(parsed) / len(records) if records else None,
        "judged": len(judged),
        "judge_errors": sum(1 for r in records if r.get("judge_error")),
        "metrics_errors": sum(1 for r in records if r.get("metrics_error")),
        "completion_tokens": _mean([r["completion_tokens"] for r in records if r.get("completion_tokens") is not None]),
        "truncation_rate": sum(r.get("finish_reason") == "length" for r in records) / len(records) if records else None,
    }
    for c in AUTOMATIC_COLUMNS:
        out[c.key] = _mean([float(r["metrics"][c.key]) for r in parsed])
    for c in JUDGE_COLUMNS:
        out[c.key] = _mean([10.0 * r["judge"]["criteria"][c.key] for r in judged])
    out["judge_score"] = _mean([float(r["judge"]["score"]) for r in judged])
    return out
