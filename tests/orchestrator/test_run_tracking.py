"""``grace run --report-to``: the option reaches the run's tracker (a real Redis; no services needed, as every
stage of the run is already done). The records a live run sends are checked in test_e2e.py."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from services.orchestrator.stack import StackInfo
from shared.cli import app
from tests.shared.test_tracking import tensorboard_scalars, tensorboard_texts

VALUES = {"parse_rate": 1.0, "truncation_rate": 0.0, "length": 120.0, "diversity": 40.0, "professionalism": 0.5,
          "relevance_summary": 0.6, "relevance_document": 0.5}  # fmt: skip


def test_grace_run_report_to_opens_the_tracker_in_the_run_folder(tmp_path, redis_url):
    settings = tmp_path / "stack" / "settings.yaml"
    settings.parent.mkdir()
    settings.write_text(f"common:\n  redis_url: {redis_url}\n")
    StackInfo(redis_url=redis_url, urls={"rollout": "http://127.0.0.1:9", "reward": "http://127.0.0.1:9"},
              config_path=str(settings)).save(tmp_path / "stack" / "stack.json")  # fmt: skip
    run_dir = tmp_path / "runs" / "tracked"
    run_dir.mkdir(parents=True)
    state = {"evaluated": {"base": VALUES, "iter 1": {**VALUES, "length": 150.0}}, "trained": [0], "iterations": {"0": {}}}
    (run_dir / "state.json").write_text(json.dumps(state))

    result = CliRunner().invoke(app, ["run", "--run-id", "tracked", "--iterations", "1", "--report-to", "tensorboard",
                                      "--stack-dir", str(tmp_path / "stack"), "--run-root", str(tmp_path / "runs")])  # fmt: skip

    assert result.exit_code == 0, result.output
    log_dir = run_dir / "tracking" / "tensorboard"
    config = tensorboard_texts(log_dir)["config"][0][1]
    assert "| run_id | tracked |" in config and "| iterations | 1 |" in config
    assert tensorboard_scalars(log_dir) == {}  # a finished run records nothing twice


def test_experiment_summary_run_holds_the_method_table_and_the_cells(tmp_path):
    from services.orchestrator.experiment import ExperimentOptions, track_summary

    options = ExperimentOptions(name="exp", methods=("sft", "grace"), seeds=1, run_root=tmp_path, report_to=("tensorboard",))
    metric = {"mean": 0.5, "ci95": [0.4, 0.6]}
    contract = {"seeds": 1, "methods": {"sft": {"avg_rank": 2.0, "metrics": {"L": metric}},
                                        "grace": {"avg_rank": 1.0, "metrics": {"L": {**metric, "mean": 0.7}}}}}  # fmt: skip
    cells = [{"method": m, "seed": 0, "run_id": f"exp-{m}-s0", "final_label": label, "final": {"length": length}}
             for m, label, length in (("sft", "base", 100.0), ("grace", "iter 3", 140.0))]  # fmt: skip
    out = tmp_path / "exp"
    out.mkdir()

    track_summary(options, contract, cells, out)

    log_dir = out / "tracking" / "tensorboard" / "exp"
    assert tensorboard_scalars(log_dir) == {"avg_rank/sft": [(0, 2.0)], "avg_rank/grace": [(0, 1.0)]}
    texts = tensorboard_texts(log_dir)
    assert "| grace | 1.0 | 0.7 |" in texts["methods"][0][1]
    assert "| grace | 0 | exp-grace-s0 | iter 3 | 140.0 |" in texts["cells"][0][1]
