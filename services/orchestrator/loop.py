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
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from services.orchestrator.progress import RedisEpoch, StageTimeout, wait_for_adapter, wait_for_samples
from services.orchestrator.stack import StackInfo
from shared.adapters import adapter_version
from shared.group_health import Outcome, group_health
from shared.jsonl import read_jsonl
from shared.local_redis import connect
from shared.runs import RunConfig, load_run_config, read_samples_file, samples_file, save_run_config
from shared.schemas import FINISH_TRUNCATED
from shared.settings import load_settings
from shared.tracking import RunRecorder, TrackingOptions, open_tracker

if TYPE_CHECKING:
    from services.orchestrator.rollout import IterationResult
    from services.rollout.config import RolloutSettings

log = logging.getLogger(__name__)

BASE_LABEL = "base"


@dataclass
class RunOptions:
    config: RunConfig
    run_dir: Path
    eval_queries: Path | None = None  # None = the stack's ``heldout_queries`` setting
    eval_limit: int | None = 8
    eval_max_tokens: int | None = None  # None = the window minus the prompt, as in sampling
    eval_temperature: float = 0.7
    eval_n: int = 1  # samples per held-out query
    eval_seed: int | None = 0  # base sampling seed of the evaluation (each query adds its index)
    stage_timeout_s: float = 3600.0
    judge: bool = False
    tracking: TrackingOptions = field(default_factory=TrackingOptions)  # --report-to: where the records also go


@dataclass
class RunState:
    """What a run has finished; saved after every stage so a restart resumes."""

    path: Path
    evaluated: dict[str, dict] = field(default_factory=dict)  # label -> summary values
    trained: list[int] = field(default_factory=list)
    iterations: dict[str, dict] = field(default_factory=dict)  # iteration -> what its samples file says

    @classmethod
    def load(cls, path: Path) -> "RunState":
        if path.exists():
            data = json.loads(path.read_text())
            return cls(path=path, evaluated=data.get("evaluated", {}), trained=data.get("trained", []),
                       iterations=data.get("iterations", {}))  # fmt: skip
        return cls(path=path)

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        state = {"evaluated": self.evaluated, "trained": self.trained, "iterations": self.iterations}
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, self.path)


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
        self.epoch = RedisEpoch(self.redis)  # one per run: a restart between two stages is seen too
        self.recorder: RunRecorder | None = None  # while run() runs: each metrics.jsonl row also goes to the trackers

    def _check_config(self) -> None:
        if self.config.rope is None:  # recorded with the run: every service checks it against its own (paper 3.6)
            self.config = self.config.model_copy(update={"rope": self.rollout_settings().rope()})
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
        tracker = open_tracker(self.options.tracking, self.run_dir, self.config.run_id, self.config.model_dump(mode="json"))
        self.recorder = RunRecorder(tracker, self.run_dir)
        try:
            return self._run()
        finally:
            tracker.close()
            self.recorder = None

    def _run(self) -> Path:
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

    def rollout_settings(self) -> RolloutSettings:
        """The stack's own settings file: the worker samples as the services are set."""
        from services.rollout.config import RolloutSettings

        return load_settings(
            RolloutSettings, self.info.config_path, run_id=self.config.run_id, gateway_url=self.info.gateway_urls()
        )

    def _iteration(self, iteration: int) -> None:
        timeout = self.options.stage_timeout_s
        started = time.perf_counter()
        k, m = self.config.queries_in(iteration), self.config.responses_per_query
        with self.console.status(f"iteration {iteration}: rollout (K={k}, m={m})"):
            result = self._rollout(iteration, timeout)
        self.console.print(
            f"iteration {iteration}: rollout published {result.published} groups "
            f"({_query_sources(result)}parsed {result.parsed_fraction:.0%}, truncated {result.truncation_rate:.0%}, "
            f"{result.completion_tokens} tokens, {result.seconds:.1f}s)"
        )

        def again() -> None:  # Redis restarted: re-publish, idempotently, what the last second of its AOF lost
            self.console.print(f"iteration {iteration}: Redis restarted; re-running the rollout stage")
            self._rollout(iteration, timeout)

        with self.console.status(f"iteration {iteration}: reward scoring and calibration"):
            marker = wait_for_samples(self.redis, self.config.run_id, iteration, timeout, epoch=self.epoch, on_restart=again)
        self.console.print(f"iteration {iteration}: reward published {marker.count} weighted samples")
        version = adapter_version(iteration)
        with self.console.status(f"iteration {iteration}: training ({self.config.loss}) and hot swap of {version}"):
            status = wait_for_adapter(self.redis, self.config.run_id, version, timeout, epoch=self.epoch, on_restart=again)
        self.console.print(f"iteration {iteration}: adapter {version} serving as policy on {status.replica}")
        trained = iteration_record(samples_file(self.run_dir.parent, self.config.run_id, iteration))
        self._evaluate(stage_label(iteration))
        self.state.trained.append(iteration)
        self.state.iterations[str(iteration)] = trained
        self.state.save()
        self._append_metrics({"iteration": iteration, "stage": "iteration", "seconds": time.perf_counter() - started,
                              "groups": result.published, "samples": marker.count, "adapter": version,
                              "heldout_dropped": result.heldout_dropped, **trained})  # fmt: skip

    def _rollout(self, iteration: int, timeout: float) -> IterationResult:
        """The iteration's rollout stage, retried while Redis or the rollout service is down or restarting
        (until ``timeout``): it skips the groups already published, so a retry only adds what is missing."""
        from services.orchestrator.rollout import run_iteration

        deadline = time.monotonic() + timeout
        while True:
            try:
                self.epoch.restarted()  # a restart seen here is handled by this very run
                return asyncio.run(run_iteration(self.rollout_settings(), self.redis, iteration, offline=self.config.offline))
            except Exception as exc:
                if not _transient(exc):
                    raise
                if time.monotonic() > deadline:
                    raise StageTimeout(f"rollout of iteration {iteration} failed for {timeout:.0f}s: {exc}") from exc
                log.warning("event=rollout_retry iteration=%d error=%s detail=%s", iteration, type(exc).__name__, str(exc)[:200])
                time.sleep(2.0)

    def _evaluate(self, label: str) -> None:
        from services.orchestrator.evaluation import EvalOptions, PolicySpec, run_eval

        slug = label.replace(" ", "-")
        settings = self.rollout_settings()
        # the base row is the starting policy itself, whatever adapter an earlier run left as `policy`
        model = settings.served_model_name if label == BASE_LABEL else settings.policy_name
        with self.console.status(f"evaluating {label} on the held-out split"):
            opts = EvalOptions(
                policies=[PolicySpec(label=label, model=model)],
                queries=self.options.eval_queries or settings.heldout_queries,
                limit=self.options.eval_limit,
                out_dir=self.run_dir / "eval" / slug,
                rollout_url=self.info.urls["rollout"] + "/v1",
                reward_url=self.info.urls["reward"],
                judge_url=self.info.urls.get("judge") if self.options.judge else None,
                judge=self.options.judge,
                max_tokens=self.options.eval_max_tokens,
                temperature=self.options.eval_temperature,
                n=self.options.eval_n,
                seed=self.options.eval_seed,
            )
            summary = run_eval(opts, progress=False)
        values = summary["policies"][label]
        self.state.evaluated[label] = values
        self.state.save()
        self._append_metrics({"stage": "eval", "label": label, **values})

    def _append_metrics(self, row: dict) -> None:
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"time": time.time(), **row}, ensure_ascii=False) + "\n")
        if self.recorder is not None:
            self.recorder.record(row)

    def labels(self) -> list[str]:
        return [BASE_LABEL] + [stage_label(i) for i in sorted(self.state.trained)]

    def table(self) -> Table:
        from services.orchestrator.report import AUTOMATIC_COLUMNS

        table = Table(title=f"run {self.config.run_id}: held-out metrics per iteration")
        table.add_column("policy")
        for column in AUTOMATIC_COLUMNS:
            table.add_column(column.title, justify="right")
        table.add_column("parsed", justify="right")
        table.add_column("truncated", justify="right")
        for label in self.labels():
            values = self.state.evaluated.get(label, {})
            cells = [_fmt(values.get(c.key), c.digits) for c in AUTOMATIC_COLUMNS]
            table.add_row(label, *cells, _fmt(values.get("parse_rate"), 2), _fmt(values.get("truncation_rate"), 2))
        return table

    def write_report(self) -> Path:
        from services.orchestrator import report

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
        mode = f"offline ({c.queries_per_iteration} queries, one round)" if c.offline else "semi-online"
        budget = f", N={c.total_queries}" if c.total_queries else ""
        lines = [
            f"# Run {c.run_id}\n",
            f"loss `{c.loss}`, {len(self.state.trained)}/{c.iterations} iterations, K={c.queries_per_iteration}, "
            f"m={c.responses_per_query}{budget}, {mode}\n",
            "## Held-out metrics per iteration (Table 4 style)\n",
            table,
            "Parse rate: " + ", ".join(f"{label} {_fmt(values[label].get('parse_rate'), 2)}" for label in labels) + "\n",
            "Truncation rate (finish_reason `length`): "
            + ", ".join(f"{label} {_fmt(values[label].get('truncation_rate'), 2)}" for label in labels)
            + "\n",
            "![z-scores during training](progress_zscores.png)\n",
            "## What each iteration trained on (`samples/iter-NNNN.jsonl`)\n",
            training_data_table(self.state.iterations),
        ]
        if curves:
            lines.append("![training curves](training_curves.png)\n")
        lines.append("Files: `metrics.jsonl` (per stage), `train_metrics.jsonl` (per step), `eval/<stage>/` (responses).\n")
        path = self.run_dir / "report.md"
        path.write_text("\n".join(lines))
        return path


def training_data_table(iterations: dict[str, dict]) -> str:
    """Markdown: per iteration, the samples, parse and truncation rates, degenerate groups and |Omega+/-|."""
    head = "| iteration | samples | parsed | truncated | degenerate groups | Omega+ | Omega- | query sources |"
    lines = [head, "|---" * 8 + "|"]
    for key in sorted(iterations, key=int):
        r = iterations[key]
        if not r:
            lines.append(f"| {key} | (no samples file here) | | | | | | |")
            continue
        sources = ", ".join(f"{n} {name}" for name, n in sorted(r["sources"].items()))
        lines.append(
            f"| {key} | {r['trained_samples']} | {_fmt(r['parse_rate'], 2)} | {_fmt(r['truncation_rate'], 2)} "
            f"| {r['degenerate_groups']}/{r['groups']} | {r['omega_plus']} | {r['omega_minus']} | {sources} |"
        )
    return "\n".join(lines) + "\n"


def _fmt(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def plot_training_curves(metrics_path: Path, out: Path) -> Path | None:
    """Loss, z_ref and learning rate per step from the trainer's JSONL (None if there is none yet)."""
    if not metrics_path.exists():
        return None
    rows = read_jsonl(metrics_path)
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


def iteration_record(path: Path) -> dict:
    """What one iteration trained on, from its samples file ({} if the trainer wrote none here).

    ``degenerate_groups``: groups with fewer than two parsed responses or all rank sums tied; their
    parsed members have Z = 0 and, by eq. 8 taken literally, count in |Omega+|. The group health
    (``zero_variance_share``, parse and truncation rates, ``<metric>_mean`` / ``<metric>_std`` for
    L, E, P, PPL_G, PPL_D, Rs, Rd) is the reward service's own figure (``shared.group_health``).
    """
    if not path.exists():
        return {}
    rows = read_samples_file(path)
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["query_id"], []).append(row)
    health = group_health([[Outcome.from_row(r) for r in members] for members in groups.values()])
    return {
        "trained_samples": len(rows),
        "truncated": sum(r["finish_reason"] == FINISH_TRUNCATED for r in rows),
        "groups": len(groups),
        "degenerate_groups": health.zero_variance_groups,
        **health.flat(),
        "omega_plus": sum(r["weight"] >= 0 and r["parsed"] for r in rows),
        "omega_minus": sum(not (r["weight"] >= 0 and r["parsed"]) for r in rows),
        "sources": dict(Counter(members[0]["source"] for members in groups.values())),
    }


def _transient(exc: BaseException) -> bool:
    """An error a retry can outlive: Redis or the rollout service down, restarting or still loading."""
    import httpx
    import openai
    import redis

    transient = (redis.ConnectionError, redis.TimeoutError, httpx.TransportError, openai.APIConnectionError,
                 openai.InternalServerError)  # fmt: skip
    return isinstance(exc, transient) or isinstance(exc.__cause__, transient)


def _query_sources(result: IterationResult) -> str:
    """Where the iteration's queries came from, for the progress line (nothing on a restart that planned nothing new)."""
    if result.generated == result.fallback == result.offline == 0:
        return ""
    made = f"{result.offline} offline" if result.offline else f"{result.generated} generated"
    dropped = f", {result.heldout_dropped} held-out dropped" if result.heldout_dropped else ""
    return f"queries: {made}, {result.fallback} seed_fallback{dropped}; "
