"""Pure report functions: ranks with ties, average rank, z-scores, the paper's table layout."""

from __future__ import annotations

import math

import pytest

from services.orchestrator import report
from services.orchestrator.report import AUTOMATIC_COLUMNS, JUDGE_COLUMNS, Column

# Table 1 of the paper: the ranks and average ranks printed there must come out of our functions.
TABLE1 = {
    "Baseline": {"length": 3878.7, "diversity": 86.58, "professionalism": 0.217, "relevance_summary": 1.983, "relevance_document": 0.982},
    "KTO": {"length": 4903.7, "diversity": 87.48, "professionalism": 0.213, "relevance_summary": 1.991, "relevance_document": 0.987},
    "GRACE (offline)": {"length": 5137.7, "diversity": 88.27, "professionalism": 0.223, "relevance_summary": 1.998, "relevance_document": 0.993},
    "GRACE (K=500)": {"length": 5255.1, "diversity": 88.41, "professionalism": 0.224, "relevance_summary": 1.989, "relevance_document": 0.996},
    "GRACE (K=250)": {"length": 5377.1, "diversity": 90.01, "professionalism": 0.257, "relevance_summary": 2.002, "relevance_document": 1.003},
}  # fmt: skip


def test_ranks_higher_is_better_and_lower_is_better():
    assert report.ranks([3.0, 1.0, 2.0]) == [1.0, 3.0, 2.0]
    assert report.ranks([3.0, 1.0, 2.0], higher_is_better=False) == [3.0, 1.0, 2.0]


def test_ties_share_the_average_rank():
    assert report.ranks([5.0, 7.0, 5.0, 1.0]) == [2.5, 1.0, 2.5, 4.0]
    assert report.ranks([2.0, 2.0, 2.0]) == [2.0, 2.0, 2.0]


def test_missing_values_rank_last_and_tie_among_themselves():
    assert report.ranks([None, 3.0, float("nan"), 4.0]) == [3.5, 2.0, 3.5, 1.0]


def test_average_rank_reproduces_table_1():
    methods = list(TABLE1)
    columns = [report.ranks([TABLE1[m][c.key] for m in methods]) for c in AUTOMATIC_COLUMNS]
    assert [col[0] for col in columns] == [5, 5, 4, 5, 5]  # Baseline's ranks in the paper
    assert report.average_ranks(columns) == pytest.approx([4.8, 4.0, 2.8, 2.4, 1.0])


def test_zscores_use_the_population_std():
    z = report.zscores([1.0, 2.0, 3.0])
    assert z == pytest.approx([-math.sqrt(1.5), 0.0, math.sqrt(1.5)])
    assert sum(z) == pytest.approx(0.0)


def test_zscores_constant_column_and_missing_values():
    assert report.zscores([4.0, 4.0]) == [0.0, 0.0]
    assert report.zscores([None, 1.0, 3.0]) == [None, -1.0, 1.0]
    assert report.zscores([None, None]) == [None, None]


def test_zscore_matrix_flips_lower_is_better_columns():
    values = {"a": {"ppl": 1.0}, "b": {"ppl": 3.0}}
    series = report.zscore_matrix(["a", "b"], values, [Column("ppl", "PPL", higher_is_better=False)])
    assert series["PPL"] == [1.0, -1.0]  # lower perplexity plots as better


def test_improvement_percent():
    assert report.improvement(5377.1, 3878.7) == pytest.approx(38.63, abs=0.01)
    assert report.improvement(1.0, 0.0) is None
    assert report.improvement(None, 1.0) is None


def test_rank_table_matches_the_paper_layout():
    table = report.rank_table(list(TABLE1), TABLE1, AUTOMATIC_COLUMNS)
    lines = table.strip().splitlines()
    assert lines[0] == "| Method | L | E | P | Rs | Rd | Avg. Rank |"
    assert lines[2] == "| Baseline | 3878.7 (5) | 86.58 (5) | 0.217 (4) | 1.983 (5) | 0.982 (5) | 4.8 |"
    assert lines[6] == "| GRACE (K=250) | 5377.1 (1) | 90.01 (1) | 0.257 (1) | 2.002 (1) | 1.003 (1) | 1.0 |"
    assert lines[7].startswith("| GRACE (K=250) vs Baseline | +38.6% | +4.0% | +18.4% | +1.0% | +2.1% |")


def test_rank_table_with_average_column_ties_and_an_unranked_row():
    values = {
        "A": {c.key: 80.0 for c in JUDGE_COLUMNS},
        "B": {c.key: 80.0 for c in JUDGE_COLUMNS} | {"tone_formality": 90.0},
        "Labeled Answer": {c.key: 99.0 for c in JUDGE_COLUMNS},
    }
    table = report.rank_table(list(values), values, JUDGE_COLUMNS, average_title="Avg.", unranked=["Labeled Answer"])
    lines = table.strip().splitlines()
    assert lines[0] == "| Method | CAR | TF | IDA | SC | PE | Avg. | Avg. Rank |"
    assert lines[2] == "| A | 80.00 (1.5) | 80.00 (2) | 80.00 (1.5) | 80.00 (1.5) | 80.00 (1.5) | 80.00 | 1.6 |"
    assert lines[3] == "| B | 80.00 (1.5) | 90.00 (1) | 80.00 (1.5) | 80.00 (1.5) | 80.00 (1.5) | 82.00 | 1.4 |"
    assert lines[4] == "| Labeled Answer | 99.00 | 99.00 | 99.00 | 99.00 | 99.00 | 99.00 | - |"  # no ranks
    assert lines[5].startswith("| B vs A | +0.0% | +12.5% |")


def test_rank_table_missing_values_print_a_dash_and_rank_last():
    values = {"A": {"length": None}, "B": {"length": 10.0}}
    table = report.rank_table(["A", "B"], values, [Column("length", "L", digits=1)], improvement_row=False)
    assert "| A | - (2) | 2.0 |" in table
    assert "| B | 10.0 (1) | 1.0 |" in table


def test_summarize_means_over_parsed_and_judged_responses():
    metrics = {c.key: 1.0 for c in AUTOMATIC_COLUMNS}
    criteria = {c.key: 7 for c in JUDGE_COLUMNS}
    records = [
        {"parsed": True, "metrics": metrics | {"length": 100.0}, "judge": {"criteria": criteria, "score": 70.0},
         "completion_tokens": 10},
        {"parsed": True, "metrics": metrics | {"length": 300.0}, "judge": None, "judge_error": "502",
         "completion_tokens": 30},
        {"parsed": False, "metrics": None, "judge": {"criteria": criteria | {"tone_formality": 9}, "score": 74.0},
         "completion_tokens": 20},
    ]  # fmt: skip
    summary = report.summarize(records)
    assert summary["length"] == 200.0  # unparsed responses have no metrics
    assert summary["parse_rate"] == pytest.approx(2 / 3)
    assert summary["tone_formality"] == 80.0  # (7 + 9) / 2 x 10
    assert summary["judge_score"] == 72.0
    assert (summary["judged"], summary["judge_errors"], summary["completion_tokens"]) == (2, 1, 20.0)


def test_context_table_layout():
    results = [
        {"method": "Extrapolation", "factor": 1.0, "ppl": 3.413, "tokens": 5377.1},
        {"method": "Extrapolation", "factor": 2.0, "ppl": 3.321, "tokens": 6593.5},
        {"method": "YaRN", "factor": 1.0, "ppl": 3.413, "tokens": 5377.1},
        {"method": "YaRN", "factor": 2.0, "ppl": None, "tokens": None, "error": "OOM"},
    ]
    table = report.context_table(results, [1.0, 2.0], 8192).strip().splitlines()
    assert table[0] == "| Extension Method | PPL 8k (1x) | #Tokens 8k (1x) | PPL 16k (2x) | #Tokens 16k (2x) |"
    assert table[2] == "| Extrapolation | 3.413 | 5377.1 | 3.321 | 6593.5 |"
    assert table[3] == "| YaRN | 3.413 | 5377.1 | OOM | OOM |"


def test_plot_writes_png_files(tmp_path):
    series = report.zscore_matrix(list(TABLE1), TABLE1, AUTOMATIC_COLUMNS)
    bars = report.plot_zscores(tmp_path / "bars.png", list(TABLE1), series)
    lines = report.plot_zscores(tmp_path / "lines.png", list(TABLE1), series, style="lines")
    for path in (bars, lines):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 5000
