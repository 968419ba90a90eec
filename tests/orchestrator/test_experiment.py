"""`grace experiment` with a minimal budget (1 seed, 1 iteration, sft and grace) on the real tiny stack:
the table, the comparison-free JSON contract, experiment.json and both figures; then a resume that
trains nothing new; then the same with kto so the grace-vs-kto comparison is written."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from services.orchestrator.experiment import ExperimentOptions, cell_id, run_experiment

NAME = "exp"


@pytest.fixture(scope="module")
def stack(tiny_stack):
    return tiny_stack


def _options(work, methods, name=NAME) -> ExperimentOptions:
    return ExperimentOptions(name=name, methods=methods, seeds=1, total_queries=2, k=2, m=3, eval_limit=2, eval_n=2,
                             eval_max_tokens=64, run_root=work / "out")  # fmt: skip


@pytest.fixture(scope="module")
def finished(stack):
    work, info = stack
    console = Console(record=True, width=200)
    contract = run_experiment(_options(work, ("sft", "grace")), info, console)
    return work, info, contract, console.export_text()


def test_writes_table_json_and_figures(finished):
    work, _, contract, shown = finished
    out = work / "out" / NAME
    assert contract["seeds"] == 1 and set(contract["methods"]) == {"sft", "grace"}
    assert "grace_vs_kto" not in contract  # only when both ran
    for name in ("sft", "grace"):
        row = contract["methods"][name]
        assert isinstance(row["avg_rank"], float) and set(row["metrics"]) == {"L", "E", "P", "Rs", "Rd"}
        for v in row["metrics"].values():
            assert v["mean"] is None or v["ci95"] == [v["mean"], v["mean"]]  # one seed: zero width
    table = (out / "table.md").read_text()
    assert "| sft |" in table and "| grace |" in table and "% gain over the sft baseline" in table
    state = json.loads((work / "runs" / cell_id(NAME, "grace", 0) / "state.json").read_text())
    share = f"{state['evaluated']['iter 1']['parse_rate']:.0%}"
    assert "## Parsed held-out answers (not ranked)" in table and f"| grace | {share} | {share} | {share} |" in table
    saved = json.loads((out / "experiment.json").read_text())
    assert saved["contract"] == json.loads(json.dumps(contract))
    assert {c["run_id"] for c in saved["cells"]} == {cell_id(NAME, "sft", 0), cell_id(NAME, "grace", 0)}
    for figure in ("figure1_zscores.png", "figure3_iterations.png"):
        assert (out / figure).stat().st_size > 1000
    assert "[1/2] sft seed 0" in shown and "[2/2] grace seed 0" in shown
    # each held-out query evaluated with eval_n = 2 samples in the final stage of the grace cell
    cell = work / "runs" / cell_id(NAME, "grace", 0)
    records = [json.loads(line) for line in (cell / "eval" / "iter-1" / "responses.jsonl").read_text().splitlines()]
    assert len(records) == 4 and {r["index"] for r in records} == {0, 1}
    config = json.loads((cell / "config.json").read_text())
    assert config["seed"] == 0 and config["loss"] == "grace_kto" and config["responses_per_query"] == 3


def test_resume_trains_nothing_new_and_kto_adds_the_comparison(finished):
    work, info, _, _ = finished
    console = Console(record=True, width=200)
    contract = run_experiment(_options(work, ("sft", "kto", "grace")), info, console)
    shown = console.export_text()
    assert "sft seed 0" in shown and shown.count("already done") == 2  # sft and grace resumed, kto ran
    delta = contract["grace_vs_kto"]
    assert isinstance(delta["avg_rank_delta"], float) and 0.0 <= delta["p_value"] <= 1.0
    assert delta["avg_rank_delta"] == pytest.approx(
        contract["methods"]["grace"]["avg_rank"] - contract["methods"]["kto"]["avg_rank"]
    )
    comparison = (work / "out" / NAME / "comparison.md").read_text()
    assert "| Avg. Rank (per unit) |" in comparison and "p-value" in comparison
    assert "## grace vs kto" in comparison and "## grace vs sft" in comparison and "| 0 |" in comparison
    saved = json.loads((work / "out" / NAME / "experiment.json").read_text())
    assert saved["grace_vs_sft"]["avg_rank"]["units"] == 2 and set(saved["seed_ranks"]["0"]) == {"sft", "kto", "grace"}
    json.dumps(contract, allow_nan=False)  # the last stdout line is strict JSON


def test_a_finished_experiment_rewrites_its_outputs_without_a_stack(finished, monkeypatch, tmp_path):
    """Its own stack's cells live in <run-root>/<name>/: when all are done no stack is started."""
    import shutil

    from services.orchestrator import experiment

    work, _, _, _ = finished
    for method in ("sft", "grace"):
        shutil.copytree(work / "runs" / cell_id(NAME, method, 0), tmp_path / NAME / cell_id(NAME, method, 0))
    monkeypatch.setattr(experiment, "_own_stack", lambda *a: pytest.fail("started a stack for finished cells"))
    options = _options(work, ("sft", "grace"))
    options.run_root = tmp_path
    contract = run_experiment(options, None, Console(record=True))
    assert contract == run_experiment(_options(work, ("sft", "grace")), finished[1], Console(record=True))
    assert "| grace |" in (tmp_path / NAME / "table.md").read_text() and (tmp_path / NAME / "figure1_zscores.png").exists()
    options.seeds = 2  # seed 1 never ran: the stack is needed
    with pytest.raises(pytest.fail.Exception, match="started a stack"):
        run_experiment(options, None, Console(record=True))
