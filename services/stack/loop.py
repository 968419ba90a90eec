"""`grace run`: the semi-online GRACE-KTO loop on a running stack.

Per iteration: the rollout worker publishes K groups of m responses sampled
from the current ``policy``; the reward service scores and calibrates them and
publishes weighted samples; the trainer trains one epoch and publishes the
adapter; the rollout service hot-swaps it. The loop waits for each stage on
the Redis streams, then evaluates the new ``policy`` on the held-out split.

Everything a run does is idempotent per iteration (group, sample and adapter
ids are deterministic), and ``state.json`` in the run folder records finished
iterations, so starting the same run id again continues where it stopped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from services.stack.progress import wait_for_adapter, wait_for_samples
from services.stack.stack import StackInfo
from shared.local_redis import connect
from shared.runs import RunConfig, load_run_config, save_run_config
from shared.settings import load_settings

if TYPE_CHECKING:
    from services.rollout.worker import IterationResult

log = logging.getLogger(__name__)

BASE_LABEL = "base"


@dataclass
class RunOptions:
    config: RunConfig
    run_dir: Path
    eval_queries: Path = Path("data/test_queries.jsonl")
    eval_limit: int | None = 8
    eval_max_tokens: int = 512
    eval_temperature: float = 0.7
    stage_timeout_s: float = 3600.0
    judge: bool = False


@dataclass
class RunState:
    """What a run has finished; saved after every stage so a restart resumes."""

    path: Path
    evaluated: dict[str, dict] = field(default_factory=dict)  # label -> summary values
    trained: list[int] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> "RunState":
        if path.exists():
            data = json.loads(path.read_text())
            return cls(path=path, evaluated=data.get("evaluated", {}), trained=data.get("trained", []))
        return cls(path=path)

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"evaluated": self.evaluated, "trained": self.trained}, indent=2))
        os.replace(tmp, self.path)


def adapter_version(iteration: int) -> str:
    from services.trainer.worker import adapter_version as trainer_version

    return trainer_version(iteration)


def stage_label(iteration: int) -> str:
    """Label of the policy trained on iteration ``iteration``'s samples."""
    return f"iter {iteration + 1}"


class SemiOnlineRun:
    def __init__(self, options: RunOptions, info: StackInfo, console: Console | None = None):
        self.options = options
        self.info = info
        self.console = console or Console()
        self.config = options.config
        self.run_dir = Path(options.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.state = RunState.load(self.run_dir / "state.json")
        self.redis = connect(info.redis_url)

    def _check_config(self) -> None:
        stored = load_run_config(self.redis, self.config.run_id)
        if stored is not None and stored.model_dump(exclude={"iterations"}) != self.config.model_dump(exclude={"iterations"}):
            raise ValueError(
                f"run {self.config.run_id} already exists with other settings {stored.model_dump()}; "
                "use a new --run-id or the same settings to continue it"
            )
        save_run_config(self.redis, self.config)
        (self.run_dir / "config.json").write_text(self.config.model_dump_json(indent=2))

    def run(self) -> Path:
        self._check_config()
        if BASE_LABEL not in self.state.evaluated:
            self._evaluate(BASE_LABEL)
        for iteration in range(self.config.iterations):
            if iteration in self.state.trained:
                self.console.print(f"[dim]iteration {iteration}: already done[/dim]")
                continue
            self._iteration(iteration)
        report = self.write_report()
        self.console.print(self.table())
        self.console.print(f"report: {report}")
        return report

    def _iteration(self, iteration: int) -> None:
        from services.rollout.config import RolloutSettings
        from services.rollout.worker import run_iteration

        timeout = self.options.stage_timeout_s
        started = time.perf_counter()
        with self.console.status(f"iteration {iteration}: rollout (K={self.config.queries_per_iteration}, m={self.config.responses_per_query})"):
            settings = load_settings(  # the stack's own settings file: the worker samples as the services are set
                RolloutSettings, self.info.config_path, run_id=self.config.run_id, gateway_url=self.info.urls["rollout"]
            )
            result = asyncio.run(run_iteration(settings, self.redis, iteration, offline=self.config.offline))
        self.console.print(
            f"iteration {iteration}: rollout published {result.published} groups "
            f"({_query_sources(result)}parsed {result.parsed_fraction:.0%}, "
            f"{result.completion_tokens} tokens, {result.seconds:.1f}s)"
        )
        with self.console.status(f"iteration {iteration}: reward scoring and calibration"):
            marker = wait_for_samples(self.redis, self.config.run_id, iteration, timeout)
        self.console.print(f"iteration {iteration}: reward published {marker.count} weighted samples")
        version = adapter_version(iteration)
        with self.console.status(f"iteration {iteration}: training ({self.config.loss}) and hot swap of {version}"):
            status = wait_for_adapter(self.redis, self.config.run_id, version, timeout)
        self.console.print(f"iteration {iteration}: adapter {version} serving as policy on {status.replica}")
        self._evaluate(stage_label(iteration))
        self.state.trained.append(iteration)
        self.state.save()
        self._append_metrics({"iteration": iteration, "stage": "iteration", "seconds": time.perf_counter() - started,
                              "groups": result.published, "samples": marker.count, "adapter": version})  # fmt: skip

    def _evaluate(self, label: str) -> None:
        from services.judge.eval import EvalOptions, PolicySpec, run_eval

        slug = label.replace(" ", "-")
        with self.console.status(f"evaluating {label} on the held-out split"):
            opts = EvalOptions(
                policies=[PolicySpec(label=label, model="policy")],
                queries=self.options.eval_queries,
                limit=self.options.eval_limit,
                out_dir=self.run_dir / "eval" / slug,
                rollout_url=self.info.urls["rollout"] + "/v1",
                reward_url=self.info.urls["reward"],
                judge_url=self.info.urls.get("judge") if self.options.judge else None,
                judge=self.options.judge,
                max_tokens=self.options.eval_max_tokens,
                temperature=self.options.eval_temperature,
            )
            summary = run_eval(opts, progress=False)
        values = summary["policies"][label]
        self.state.evaluated[label] = values
        self.state.save()
        self._append_metrics({"stage": "eval", "label": label, **values})

    def _append_metrics(self, row: dict) -> None:
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"time": time.time(), **row}, ensure_ascii=False) + "\n")

    def labels(self) -> list[str]:
        return [BASE_LABEL] + [stage_label(i) for i in sorted(self.state.trained)]

    def table(self) -> Table:
        from services.judge.report import AUTOMATIC_COLUMNS

        table = Table(title=f"run {self.config.run_id}: held-out metrics per iteration")
        table.add_column("policy")
        for column in AUTOMATIC_COLUMNS:
            table.add_column(column.title, justify="right")
        table.add_column("parsed", justify="right")
        for label in self.labels():
            values = self.state.evaluated.get(label, {})
            cells = [_fmt(values.get(c.key), c.digits) for c in AUTOMATIC_COLUMNS]
            table.add_row(label, *cells, _fmt(values.get("parse_rate"), 2))
        return table

    def write_report(self) -> Path:
        from services.judge import report

        labels = self.labels()
        values = {label: self.state.evaluated[label] for label in labels}
        columns = list(report.AUTOMATIC_COLUMNS) + (list(report.JUDGE_COLUMNS) if self.options.judge else [])
        table = report.rank_table(labels, values, columns, method_title="Training Progress")
        report.plot_zscores(
            self.run_dir / "progress_zscores.png", labels, report.zscore_matrix(labels, values, columns),
            style="lines", title="Z-score Normalized Metrics During Training",
        )  # fmt: skip
        curves = plot_training_curves(self.run_dir / "train_metrics.jsonl", self.run_dir / "training_curves.png")
        c = self.config
        lines = [
            f"# Run {c.run_id}\n",
            f"loss `{c.loss}`, {len(self.state.trained)}/{c.iterations} iterations, K={c.queries_per_iteration}, "
            f"m={c.responses_per_query}, {'offline' if c.offline else 'semi-online'}\n",
            "## Held-out metrics per iteration (Table 4 style)\n",
            table,
            "Parse rate: " + ", ".join(f"{label} {_fmt(values[label].get('parse_rate'), 2)}" for label in labels) + "\n",
            "![z-scores during training](progress_zscores.png)\n",
        ]
        if curves:
            lines.append("![training curves](training_curves.png)\n")
        lines.append("Files: `metrics.jsonl` (per stage), `train_metrics.jsonl` (per step), `eval/<stage>/` (responses).\n")
        path = self.run_dir / "report.md"
        path.write_text("\n".join(lines))
        return path


def _fmt(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def plot_training_curves(metrics_path: Path, out: Path) -> Path | None:
    """Loss, z_ref and learning rate per step from the trainer's JSONL (None if there is none yet)."""
    if not metrics_path.exists():
        return None
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    keys = [k for k in ("loss", "z_ref", "reward_margin", "lr") if any(k in r for r in rows)]
    if not rows or not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    axes = [axes] if len(keys) == 1 else list(axes)
    for ax, key in zip(axes, keys):
        points = [(i, r[key]) for i, r in enumerate(rows) if isinstance(r.get(key), (int, float))]
        ax.plot([p[0] for p in points], [p[1] for p in points], linewidth=1)
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _query_sources(result: IterationResult) -> str:
    """Where the iteration's queries came from, for the progress line (nothing for a fixed offline set)."""
    if result.generated == result.fallback == 0:
        return ""
    return f"queries: {result.generated} generated, {result.fallback} seed_fallback; "
