"""Experiment tracking: ``--report-to tensorboard,mlflow,wandb`` (TRL's convention; default ``none``).

A run sends to every backend asked for what it already writes into its folder:

- ``train/<key>``: each trainer step of ``train_metrics.jsonl`` (loss, z_ref, lr, ...), on one step axis for
  the whole run; the trainer is another process, so the orchestrator reads its steps back once the iteration's
  adapter is served, and the trainer needs no tracking library;
- ``iteration/<key>``: each iteration record of ``metrics.jsonl`` (samples, parse rate, degenerate groups, ...),
  at step = iterations trained;
- ``eval/<key>``: each held-out evaluation summary at the same step (0 = the starting policy), and the
  evaluated responses as the table ``eval_responses/<stage>``.

Nothing leaves the machine unless asked: TensorBoard writes event files; MLflow writes a local file store
unless ``MLFLOW_TRACKING_URI`` names another, with its usage telemetry off unless ``MLFLOW_DISABLE_TELEMETRY``
is set; W&B runs offline unless ``WANDB_MODE`` says otherwise. Files go to ``<tracking dir>/tensorboard``,
``<tracking dir>/mlruns`` and ``<tracking dir>/wandb``; the tracking dir is ``<run dir>/tracking`` unless
an experiment shares one between its cells.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from shared.jsonl import read_jsonl

log = logging.getLogger(__name__)

BACKENDS = ("tensorboard", "mlflow", "wandb")
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # what `pip install` needs
DEFAULT_PROJECT = "grace"  # MLflow experiment / W&B project of a lone run
BASE_LABEL = "base"  # the starting policy's evaluation label (services.orchestrator.loop.BASE_LABEL)


def installed(backend: str) -> bool:
    return importlib.util.find_spec(PACKAGES[backend]) is not None


def parse_report_to(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"tensorboard,mlflow"`` -> ("tensorboard", "mlflow"); ``none`` or empty -> (); ``all`` -> every installed backend.

    Raises ValueError naming an unknown backend, or a backend whose package is not installed, before a run starts.
    """
    names = value.split(",") if isinstance(value, str) else list(value or ())
    names = [n.strip().lower() for n in names if n.strip()]
    if names in ([], ["none"]):
        return ()
    if names == ["all"]:
        return tuple(b for b in BACKENDS if installed(b))
    if {"none", "all"} & set(names):
        raise ValueError(f"--report-to {','.join(names)}: 'none' and 'all' stand alone")
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise ValueError(
            f"--report-to: unknown backend(s) {', '.join(map(repr, unknown))}; choose none, all, "
            f"or a comma-separated list of {', '.join(BACKENDS)}"
        )
    missing = [n for n in names if not installed(n)]
    if missing:
        packages = " ".join(PACKAGES[n] for n in missing)
        raise ValueError(
            f"--report-to {','.join(missing)} needs the `{packages}` package, which is not installed: pip install {packages}"
        )
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class TrackingOptions:
    report_to: tuple[str, ...] = ()  # parsed by parse_report_to; () = nothing recorded anywhere
    directory: Path | None = None  # None = <run dir>/tracking
    group: str | None = None  # an experiment's cells share ``directory``: tensorboard/<run>, one MLflow experiment, a W&B group


# --------------------------------------------------------------------------- pure helpers


def flatten(row: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings joined with dots: {"metrics": {"length": 3}} -> {"metrics.length": 3}."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def scalar_metrics(values: Mapping[str, Any], prefix: str = "", skip: Sequence[str] = ()) -> dict[str, float]:
    """The finite numbers of a record under ``prefix``/: strings, lists and None (an unmeasured metric) are left out."""
    out = {}
    for key, value in flatten({k: v for k, v in values.items() if k not in skip}).items():
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[f"{prefix}/{key}" if prefix else key] = float(value)
    return out


def table_columns(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """(columns in first-seen order, one list of cells per row); nested mappings flattened, lists as JSON."""
    flat = [flatten(r) for r in rows]
    columns = list(dict.fromkeys(k for r in flat for k in r))

    def cell(value: Any) -> Any:
        return value if value is None or isinstance(value, (str, int, float, bool)) else json.dumps(value, ensure_ascii=False)

    return columns, [[cell(r.get(c)) for c in columns] for r in flat]


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as a Markdown table (what TensorBoard's text tab renders)."""
    columns, data = table_columns(rows)
    if not columns:
        return "(no rows)"

    def text(value: Any) -> str:
        return "" if value is None else str(value).replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(text(v) for v in row) + " |" for row in data]
    return "\n".join(lines)


def trainer_steps(rows: Sequence[Mapping[str, Any]]) -> list[tuple[int, Mapping[str, Any]]]:
    """(run-long step, row) for the rows of ``train_metrics.jsonl``: iterations in order, each one's last
    attempt only (a retried training writes its steps again), numbered 1, 2, ... across the run, so a
    restarted run numbers the same steps the same way."""
    last: dict[int, float] = {}
    for r in rows:
        if r.get("iteration") is not None:
            last[r["iteration"]] = max(last.get(r["iteration"], -math.inf), r.get("attempt", 0))
    kept = [r for r in rows if r.get("iteration") in last and r.get("attempt", 0) == last[r["iteration"]]]
    kept.sort(key=lambda r: r["iteration"])  # stable: file order within an iteration
    return list(enumerate(kept, 1))


def policy_step(label: str) -> int:
    """Iterations trained into an evaluated policy: ``base`` = 0, ``iter N`` = N (loop.stage_label)."""
    if label == BASE_LABEL:
        return 0
    try:
        return int(label.rsplit(" ", 1)[-1])
    except ValueError:
        raise ValueError(f"evaluation label {label!r} is neither {BASE_LABEL!r} nor 'iter N'") from None


# --------------------------------------------------------------------------- backends


class Tracker(Protocol):
    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None: ...

    def log_table(self, name: str, rows: Sequence[Mapping[str, Any]], step: int = 0) -> None: ...

    def close(self) -> None: ...


class TensorBoardTracker:
    """Scalars per tag; tables and the run's config as Markdown in the text tab (TensorBoard has no table)."""

    def __init__(self, log_dir: Path, config: Mapping[str, Any] | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(str(self.log_dir))
        if config:
            self.writer.add_text("config", markdown_table([{"key": k, "value": v} for k, v in flatten(config).items()]))

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        for tag, value in scalar_metrics(metrics).items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def log_table(self, name: str, rows: Sequence[Mapping[str, Any]], step: int = 0) -> None:
        self.writer.add_text(name, markdown_table(rows), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MlflowTracker:
    """One MLflow run per run id, found again by its tag when the same run id continues; tables as
    ``tables/<name>.json`` artifacts (MLflow's table format, ``mlflow.load_table``)."""

    RUN_TAG = "grace.run_id"

    def __init__(self, store_dir: Path, run_name: str, experiment: str, config: Mapping[str, Any] | None = None):
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # read when mlflow is imported: nothing sent unasked
        uri = os.environ.get("MLFLOW_TRACKING_URI") or Path(store_dir).resolve().as_uri()
        if uri.startswith("file:"):  # MLflow 3 refuses its file store unless opted in; sqlite needs sqlalchemy
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self._metric, self.uri = Metric, uri
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or experiment
        found = self.client.get_experiment_by_name(name)
        experiment_id = found.experiment_id if found is not None else self.client.create_experiment(name)
        runs = self.client.search_runs([experiment_id], filter_string=f"tags.`{self.RUN_TAG}` = '{run_name}'", max_results=1)
        if runs:
            self.run_id = runs[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=run_name, tags={self.RUN_TAG: run_name}).info.run_id
        if config:
            params = [Param(k, str(v)) for k, v in flatten(config).items()]
            self.client.log_batch(self.run_id, params=params)

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        now = int(time.time() * 1000)
        batch = [self._metric(key, value, now, step) for key, value in scalar_metrics(metrics).items()]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_table(self, name: str, rows: Sequence[Mapping[str, Any]], step: int = 0) -> None:
        import pandas as pd

        columns, data = table_columns(rows)
        self.client.log_table(self.run_id, pd.DataFrame(data, columns=columns), f"tables/{name}.json")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandbTracker:
    """A W&B run, offline unless ``WANDB_MODE`` says otherwise. Each key prefix (``train``, ``iteration``,
    ``eval``) gets its own step metric, as W&B's own step must only grow and these axes differ."""

    def __init__(self, directory: Path, run_name: str, group: str | None, config: Mapping[str, Any] | None = None):
        import wandb

        self._wandb = wandb
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT), name=run_name, group=group, dir=str(directory),
            mode=os.environ.get("WANDB_MODE", "offline"), config=dict(config or {}),
        )  # fmt: skip
        self.axes: set[str] = set()

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        by_axis: dict[str, dict[str, float]] = {}
        for key, value in scalar_metrics(metrics).items():
            by_axis.setdefault(key.split("/", 1)[0] if "/" in key else "metrics", {})[key] = value
        for axis, values in by_axis.items():
            if axis not in self.axes:
                self.run.define_metric(f"{axis}/step")
                self.run.define_metric(f"{axis}/*", step_metric=f"{axis}/step")
                self.axes.add(axis)
            self.run.log({**values, f"{axis}/step": step})

    def log_table(self, name: str, rows: Sequence[Mapping[str, Any]], step: int = 0) -> None:
        columns, data = table_columns(rows)
        self.run.log({name: self._wandb.Table(columns=columns, data=data)})

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """Every backend asked for, behind one Tracker; with none it does nothing."""

    def __init__(self, trackers: Sequence[Tracker] = ()):
        self.trackers = list(trackers)

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        for t in self.trackers:
            t.log_metrics(step, metrics)

    def log_table(self, name: str, rows: Sequence[Mapping[str, Any]], step: int = 0) -> None:
        for t in self.trackers:
            t.log_table(name, rows, step)

    def close(self) -> None:
        for t in self.trackers:
            t.close()


def open_tracker(options: TrackingOptions, run_dir: Path, run_name: str, config: Mapping[str, Any] | None = None) -> Trackers:
    """The backends of ``options`` for one run (none: a Trackers that does nothing and writes no file)."""
    directory = Path(options.directory) if options.directory is not None else Path(run_dir) / "tracking"
    opened: list[Tracker] = []
    try:
        for name in parse_report_to(options.report_to):
            if name == "tensorboard":
                log_dir = directory / "tensorboard" / run_name if options.group else directory / "tensorboard"
                opened.append(TensorBoardTracker(log_dir, config))
            elif name == "mlflow":
                opened.append(MlflowTracker(directory / "mlruns", run_name, options.group or DEFAULT_PROJECT, config))
            else:
                opened.append(WandbTracker(directory, run_name, options.group, config))
    except BaseException:
        Trackers(opened).close()
        raise
    return Trackers(opened)


# --------------------------------------------------------------------------- a run's records


class RunRecorder:
    """Sends a run folder's records to a tracker as the orchestrator appends them to ``metrics.jsonl``."""

    def __init__(self, tracker: Tracker, run_dir: Path):
        self.tracker = tracker
        self.run_dir = Path(run_dir)

    def record(self, row: Mapping[str, Any]) -> None:
        """One ``metrics.jsonl`` row: an iteration record (with its trainer steps) or an evaluation summary
        (with its responses as a table); other rows are not tracked."""
        if not self.tracker:
            return
        try:
            self._record(row)
        except Exception as exc:  # a tracking server that is down must not stop a run of hours; the run folder has it all
            log.warning("event=tracking_failed stage=%s error=%s", row.get("stage"), exc)

    def _record(self, row: Mapping[str, Any]) -> None:
        if row.get("stage") == "iteration":
            iteration = int(row["iteration"])
            self._trainer_steps(iteration)
            self.tracker.log_metrics(iteration + 1, scalar_metrics(row, "iteration", skip=("time", "iteration")))
        elif row.get("stage") == "eval":
            step = policy_step(row["label"])
            self.tracker.log_metrics(step, scalar_metrics(row, "eval", skip=("time",)))
            slug = row["label"].replace(" ", "-")
            responses = self.run_dir / "eval" / slug / "responses.jsonl"
            if responses.exists():
                self.tracker.log_table(f"eval_responses/{slug}", read_jsonl(responses), step)

    def _trainer_steps(self, iteration: int) -> None:
        path = self.run_dir / "train_metrics.jsonl"
        if not path.exists():
            return
        for step, row in trainer_steps(read_jsonl(path)):
            if row["iteration"] == iteration:
                self.tracker.log_metrics(step, scalar_metrics(row, "train", skip=("attempt", "step", "steps")))
