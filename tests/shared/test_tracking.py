"""Experiment tracking (``--report-to``): written through the real TensorBoard and MLflow libraries into a
temporary folder and read back with their own readers (EventAccumulator, MlflowClient); nothing leaves the machine."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from shared.tracking import (
    BACKENDS,
    RunRecorder,
    TrackingOptions,
    markdown_table,
    open_tracker,
    parse_report_to,
    policy_step,
    scalar_metrics,
    table_columns,
    trainer_steps,
)

HAS_WANDB = importlib.util.find_spec("wandb") is not None


@pytest.fixture(autouse=True)
def _local_only(monkeypatch):
    """A developer's own tracking server or W&B settings must not catch the test's records."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_MODE", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, round(e.value, 6)) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tensorboard_texts(log_dir: Path) -> dict[str, list[tuple[int, str]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag.removesuffix("/text_summary"): [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag)]
            for tag in acc.Tags()["tensors"]}  # fmt: skip


def mlflow_client(tracking_dir: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=(tracking_dir / "mlruns").resolve().as_uri())


def mlflow_runs(tracking_dir: Path, experiment: str = "grace") -> list:
    client = mlflow_client(tracking_dir)
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


# --------------------------------------------------------------------------- the option


def test_report_to_follows_trl_convention():
    assert parse_report_to("none") == parse_report_to("") == parse_report_to(None) == ()
    assert parse_report_to(" TensorBoard , mlflow,tensorboard") == ("tensorboard", "mlflow")
    assert parse_report_to(("mlflow",)) == ("mlflow",)
    assert parse_report_to("all") == ("tensorboard", "mlflow") + (("wandb",) if HAS_WANDB else ())


def test_unknown_backend_is_refused_with_the_valid_names():
    with pytest.raises(ValueError, match="'comet'") as err:
        parse_report_to("tensorboard,comet")
    for name in ("none", "all", *BACKENDS):
        assert name in str(err.value)
    with pytest.raises(ValueError, match="stand alone"):
        parse_report_to("none,mlflow")


@pytest.mark.skipif(HAS_WANDB, reason="wandb is installed: the offline run is tested instead")
def test_wandb_without_the_package_is_a_clear_error():
    with pytest.raises(ValueError, match=r"needs the `wandb` package, which is not installed: pip install wandb"):
        parse_report_to("tensorboard,wandb")


def test_grace_commands_refuse_a_bad_report_to_before_any_work(tmp_path):
    from typer.testing import CliRunner

    from shared.cli import app

    for command in (["run", "--run-id", "r"], ["experiment", "--run-root", str(tmp_path)]):
        result = CliRunner().invoke(app, [*command, "--report-to", "tensorboard,neptune"])
        assert result.exit_code == 2, result.output
        assert "neptune" in result.output and "tensorboard, mlflow, wandb" in result.output
    assert list(tmp_path.iterdir()) == []  # the experiment stopped before making its folder


# --------------------------------------------------------------------------- pure helpers


def test_scalar_metrics_keeps_finite_numbers_and_flattens_counts():
    row = {"time": 1.0, "stage": "iteration", "samples": 6, "parse_rate": 0.5, "Rs": None, "adapter": "iter-0000",
           "sources": {"generated": 2, "seed_fallback": 1}, "bad": float("inf")}  # fmt: skip
    assert scalar_metrics(row, "iteration", skip=("time",)) == {
        "iteration/samples": 6.0, "iteration/parse_rate": 0.5,
        "iteration/sources.generated": 2.0, "iteration/sources.seed_fallback": 1.0,
    }  # fmt: skip


def test_table_columns_union_of_keys_nested_flattened_lists_as_json():
    rows = [{"query": "q", "metrics": {"length": 3}}, {"query": "r|s", "judge": {"criteria": {"tone": 7}}, "tags": [1, 2]}]
    columns, data = table_columns(rows)
    assert columns == ["query", "metrics.length", "judge.criteria.tone", "tags"]
    assert data == [["q", 3, None, None], ["r|s", None, 7, "[1, 2]"]]
    assert markdown_table([{"a": "x|y\nz"}]).splitlines() == ["| a |", "|---|", "| x\\|y<br>z |"]


def test_trainer_steps_number_the_last_attempt_of_each_iteration_across_the_run():
    rows = [
        {"iteration": 0, "attempt": 1.0, "step": 1, "loss": 9.0},  # a training that died and was retried
        {"iteration": 0, "attempt": 2.0, "step": 1, "loss": 0.7},
        {"iteration": 0, "attempt": 2.0, "step": 2, "loss": 0.6},
        {"iteration": 1, "attempt": 3.0, "step": 1, "loss": 0.5},
    ]
    assert [(step, r["loss"]) for step, r in trainer_steps(rows)] == [(1, 0.7), (2, 0.6), (3, 0.5)]
    assert [(step, r["loss"]) for step, r in trainer_steps(rows[:3])] == [(1, 0.7), (2, 0.6)]  # the same numbers earlier


def test_policy_step_counts_iterations_trained():
    assert [policy_step(label) for label in ("base", "iter 1", "iter 12")] == [0, 1, 12]
    with pytest.raises(ValueError, match="'final'"):
        policy_step("final")


# --------------------------------------------------------------------------- backends, read back


def test_no_backend_writes_nothing(tmp_path):
    tracker = open_tracker(TrackingOptions(), tmp_path, "r1", {"run_id": "r1"})
    RunRecorder(tracker, tmp_path).record({"stage": "eval", "label": "base", "length": 3.0})
    tracker.close()
    assert not tracker and list(tmp_path.iterdir()) == []


def test_tensorboard_event_files_hold_the_scalars_and_tables(tmp_path):
    tracker = open_tracker(
        TrackingOptions(report_to=("tensorboard",)), tmp_path, "r1", {"run_id": "r1", "rope": {"yarn_factor": 2.0}}
    )
    tracker.log_metrics(1, {"train/loss": 0.75, "train/lr": 1e-4})
    tracker.log_metrics(2, {"train/loss": 0.5, "train/note": "text is not a scalar"})
    tracker.log_table("eval_responses/base", [{"query": "q1", "metrics": {"length": 120}}], step=0)
    tracker.close()
    log_dir = tmp_path / "tracking" / "tensorboard"
    assert tensorboard_scalars(log_dir) == {"train/loss": [(1, 0.75), (2, 0.5)], "train/lr": [(1, 0.0001)]}
    texts = tensorboard_texts(log_dir)
    assert texts["eval_responses/base"] == [(0, "| query | metrics.length |\n|---|---|\n| q1 | 120 |")]
    assert "| rope.yarn_factor | 2.0 |" in texts["config"][0][1]


def test_mlflow_local_store_holds_metric_history_params_and_table(tmp_path):
    options = TrackingOptions(report_to=("mlflow",))
    tracker = open_tracker(options, tmp_path, "r1", {"run_id": "r1", "loss": "grace_kto"})
    tracker.log_metrics(1, {"train/loss": 0.75})
    tracker.log_table("eval_responses/iter-1", [{"query": "q1", "response": "a", "metrics": {"length": 3.5}}], step=1)
    tracker.close()
    again = open_tracker(options, tmp_path, "r1", {"run_id": "r1", "loss": "grace_kto"})  # the same run id continues
    again.log_metrics(2, {"train/loss": 0.5})
    again.close()

    (run,) = mlflow_runs(tmp_path / "tracking")
    client = mlflow_client(tmp_path / "tracking")
    assert run.info.run_name == "r1" and run.info.status == "FINISHED"
    assert run.data.params == {"run_id": "r1", "loss": "grace_kto"}
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")] == [(1, 0.75), (2, 0.5)]
    table = json.loads(
        Path(client.download_artifacts(run.info.run_id, "tables/eval_responses/iter-1.json", str(tmp_path))).read_text()
    )
    assert table["columns"] == ["query", "response", "metrics.length"] and table["data"] == [["q1", "a", 3.5]]


@pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed (its absence is tested above)")
def test_wandb_offline_run_is_written_locally(tmp_path):
    tracker = open_tracker(TrackingOptions(report_to=("wandb",)), tmp_path, "r1", {"run_id": "r1"})
    tracker.log_metrics(1, {"train/loss": 0.75})
    tracker.log_metrics(0, {"eval/length": 3.0})  # another axis: W&B's own step never goes back
    tracker.log_table("eval_responses/base", [{"query": "q1"}])
    tracker.close()
    assert list((tmp_path / "tracking" / "wandb").glob("offline-run-*"))


# --------------------------------------------------------------------------- a run's records


def write_run_folder(run_dir: Path) -> None:
    """What the trainer and the evaluation leave in a run folder, in their shapes."""
    run_dir.mkdir(parents=True)
    steps = [{"run_id": "r1", "attempt": 5.0, "loss_name": "grace_kto", "iteration": 0, "step": s, "steps": 2,
              "loss": loss, "z_ref": 0.1, "lr": 1e-4} for s, loss in ((1, 0.7), (2, 0.6))]  # fmt: skip
    steps.append({**steps[0], "attempt": 9.0, "iteration": 1, "loss": 0.4})
    (run_dir / "train_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
    responses = run_dir / "eval" / "iter-1" / "responses.jsonl"
    responses.parent.mkdir(parents=True)
    record = {"policy": "iter 1", "query_id": "q1", "query": "Write a memo", "index": 0, "response": '{"title": "M"}',
              "finish_reason": "stop", "parsed": True, "metrics": {"length": 12.0, "diversity": 0.5}, "judge": None}  # fmt: skip
    responses.write_text(json.dumps(record) + "\n")


def test_run_recorder_sends_trainer_steps_iteration_records_and_eval_tables(tmp_path):
    run_dir = tmp_path / "runs" / "r1"
    write_run_folder(run_dir)
    tracker = open_tracker(TrackingOptions(report_to=("tensorboard", "mlflow")), run_dir, "r1")
    recorder = RunRecorder(tracker, run_dir)
    recorder.record({"stage": "eval", "label": "iter 1", "parse_rate": 1.0, "length": 12.0, "Rs": None})
    recorder.record({"iteration": 0, "stage": "iteration", "seconds": 3.5, "groups": 2, "samples": 6,
                     "adapter": "iter-0000", "parse_rate": 0.5, "sources": {"generated": 2}})  # fmt: skip
    tracker.close()

    scalars = tensorboard_scalars(run_dir / "tracking" / "tensorboard")
    assert scalars["train/loss"] == [(1, 0.7), (2, 0.6)]  # iteration 1's step is recorded with iteration 1
    assert scalars["train/iteration"] == [(1, 0.0), (2, 0.0)] and "train/step" not in scalars
    assert scalars["iteration/samples"] == [(1, 6.0)] and scalars["iteration/sources.generated"] == [(1, 2.0)]
    assert scalars["eval/length"] == [(1, 12.0)] and "eval/Rs" not in scalars
    table = tensorboard_texts(run_dir / "tracking" / "tensorboard")["eval_responses/iter-1"]
    assert table[0][0] == 1 and "| Write a memo |" in table[0][1] and "metrics.diversity" in table[0][1]

    (run,) = mlflow_runs(run_dir / "tracking")
    client = mlflow_client(run_dir / "tracking")
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")] == [(1, 0.7), (2, 0.6)]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "tables/eval_responses")] == [
        "tables/eval_responses/iter-1.json"
    ]


def test_experiment_cells_share_one_tracking_folder_side_by_side(tmp_path):
    options = TrackingOptions(report_to=("tensorboard", "mlflow"), directory=tmp_path / "exp" / "tracking", group="exp")
    for cell, loss in (("exp-grace-s0", 0.5), ("exp-kto-s0", 0.9)):
        tracker = open_tracker(options, tmp_path / "runs" / cell, cell)
        tracker.log_metrics(1, {"train/loss": loss})
        tracker.close()
    assert tensorboard_scalars(tmp_path / "exp" / "tracking" / "tensorboard" / "exp-kto-s0") == {"train/loss": [(1, 0.9)]}
    runs = mlflow_runs(tmp_path / "exp" / "tracking", experiment="exp")
    assert sorted((r.info.run_name, r.data.metrics["train/loss"]) for r in runs) == [("exp-grace-s0", 0.5), ("exp-kto-s0", 0.9)]
    assert not (tmp_path / "runs").exists()


def test_a_failing_backend_is_logged_and_the_run_goes_on(tmp_path, caplog):
    class Unreachable:  # a tracking server that went away mid-run
        def log_metrics(self, step, metrics):
            raise ConnectionError("tracking server down")

        def log_table(self, name, rows, step=0):
            raise ConnectionError("tracking server down")

        def close(self):
            pass

    from shared.tracking import Trackers

    RunRecorder(Trackers([Unreachable()]), tmp_path).record({"stage": "eval", "label": "base", "length": 3.0})
    assert "event=tracking_failed stage=eval error=tracking server down" in caplog.text
