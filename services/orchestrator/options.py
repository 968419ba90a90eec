"""The options of `grace stack up`, `grace run`, `grace rollout-iteration`, `grace demo`, `grace experiment` and
`grace eval`: each field is also its CLI option (shared/cli_options.py). Kept apart from the modules that run them,
which import heavy libraries, since the CLI loads these to build its commands."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from shared.cli_options import comma_list, opt
from shared.tracking import parse_report_to

if TYPE_CHECKING:
    from services.orchestrator.loop import RunOptions

METHODS = ("sft", "kto", "dpo", "orpo", "grace_offline", "grace", "grpo")
REPORT_TO_HELP = (
    "also record trainer steps, iteration records and evaluation tables in: none, all, or a comma-separated "
    "list of tensorboard, mlflow, wandb (files under the run folder's tracking/; MLflow local unless "
    "MLFLOW_TRACKING_URI is set, W&B offline unless WANDB_MODE is set)"
)


def or_none(value):
    """0 or '' on the command line -> None."""
    return value or None


def default_out(prefix: str) -> Path:
    """<run_root>/<run_id>/<prefix>-<time> of the common settings."""
    from shared.settings import ServiceSettings

    settings = ServiceSettings()
    return settings.run_root / settings.run_id / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


@dataclass
class StackOptions:
    stack_dir: Path = opt(Path("runs/stack"), "settings, logs, Redis data and stack.json go here")
    services: tuple[str, ...] = opt(("rollout", "reward", "trainer", "judge"), "comma-separated services to start",
                                    cli_type=str, cli_default="rollout,reward,trainer,judge", parse=comma_list)  # fmt: skip
    policy_model: str | None = opt(None, "policy model folder (default: settings / tiny set)")
    adapter_root: Path | None = opt(None, "adapter store (default: <stack-dir>/adapters)")
    run_root: Path | None = opt(None, "run folders (default: runs)")
    rollout_replicas: int = opt(1, "rollout services, each with its own vLLM; runs spread sampling over them", min=1)


@dataclass
class RunCommandOptions:
    run_id: str = opt(..., "run id; the same id continues an interrupted run")
    iterations: int = opt(3, "semi-online iterations (ignored with --total-queries)")
    queries: int = opt(8, "K new queries per iteration (paper: 250 or 500)", "--queries", "-k")
    total_queries: int | None = opt(None, "query budget N (paper: 1000): ceil(N/K) iterations; offline: all N at once",
                                    "--total-queries", "-n", min=1)  # fmt: skip
    responses: int = opt(8, "m responses per query (paper: 8)", "--responses", "-m")
    loss: str = opt("grace_kto", "grace_kto, or a baseline: kto, dpo, orpo, sft, grpo")
    offline: bool = opt(False, "GRACE (offline): N queries generated once, sampled once from the starting policy, "
                        "calibrated as one dataset, trained --epochs epochs", "--offline")  # fmt: skip
    epochs: int | None = opt(None, "epochs per round (default: the trainer's setting, 1)", min=1)
    stack_dir: Path = opt(Path("runs/stack"), "folder of the running stack (its stack.json)")
    run_root: Path = opt(Path("runs"), "the run folder is <run-root>/<run-id>")
    eval_limit: int = opt(8, "held-out requests evaluated per iteration")
    judge: bool = opt(False, "also judge the held-out responses with the judge service")
    report_to: tuple[str, ...] = opt((), REPORT_TO_HELP, cli_type=str, cli_default="none", parse=parse_report_to)
    max_staleness: int | None = opt(0, "adapter versions a trained sample may lag behind the on-policy one (0: on-policy, "
                                    "as the paper; -1: any)", min=-1, parse=lambda v: None if v == -1 else v)  # fmt: skip

    def run_options(self) -> RunOptions:
        """The run's config and options, as the loop takes them."""
        from services.orchestrator.loop import RunOptions
        from shared.runs import RunConfig
        from shared.tracking import TrackingOptions

        config = RunConfig.from_budget(self.run_id, total_queries=self.total_queries, k=self.queries, offline=self.offline,
                                       iterations=self.iterations, responses_per_query=self.responses, loss=self.loss,
                                       epochs=self.epochs, max_staleness=self.max_staleness)  # fmt: skip
        return RunOptions(config=config, run_dir=self.run_root / self.run_id, eval_limit=self.eval_limit, judge=self.judge,
                          tracking=TrackingOptions(report_to=self.report_to))  # fmt: skip


@dataclass
class RolloutIterationOptions:
    iteration: int = opt(..., "iteration number")
    run_id: str | None = opt(None, "run id (default: settings.run_id)")
    k: int | None = opt(None, "K queries (default: the run's config, else settings)")
    m: int | None = opt(None, "m responses per query (default: the run's config, else settings)")
    offline: bool | None = opt(None, "the offline round: K queries generated once (source offline)", "--offline/--online")
    gateway_url: str | None = opt(None, "rollout gateway URL (default: settings.gateway_url)")


@dataclass
class DemoOptions:
    work_dir: Path = opt(Path("runs/demo"), "models, SFT policy, stack and runs go here")
    run_id: str | None = opt(None, "continue this run id (default: a new one)")
    iterations: int = 3
    queries: int = opt(16, "new queries per iteration (K)", "--queries", "-k")
    responses: int = opt(8, "responses per query (m; paper: 8)", "--responses", "-m")
    loss: str = "grace_kto"
    eval_limit: int = opt(24, cli=False)  # every held-out query
    eval_n: int = opt(4, cli=False)  # samples per held-out query: 96 answers per row, so a row's L is not noise
    eval_max_tokens: int | None = opt(None, cli=False)  # the window minus the prompt, as in sampling


@dataclass
class ExperimentOptions:
    name: str = opt("experiment", "experiment id: outputs in <run-root>/<name>/, cells <name>-<method>-s<seed>")
    methods: tuple[str, ...] = opt(METHODS, "comma-separated methods", cli_type=str, cli_default=",".join(METHODS),
                                   parse=comma_list)  # fmt: skip
    seeds: int = opt(3, "seeds per method (S)", min=1)
    total_queries: int | None = opt(48, "query budget N of every method (0: K x --iterations)", "--total-queries", "-n",
                                    min=0, parse=or_none)  # fmt: skip
    k: int = opt(16, "K queries per semi-online round: ceil(N/K) rounds", "-k")
    m: int = opt(8, "m responses per query", "-m")
    iterations: int = opt(3, "semi-online rounds when --total-queries is 0 (N = K x rounds)")
    epochs: int | None = opt(None, "epochs per round (default: the trainer's setting)", min=1)
    eval_limit: int | None = opt(12, "held-out queries evaluated per policy (0: all)", parse=or_none)
    eval_n: int = opt(4, "samples per held-out query")
    eval_max_tokens: int | None = opt(None, cli=False)
    stack_dir: Path | None = opt(None, "use this running stack (its stack.json); default: bring up the tiny stack")
    run_root: Path = opt(Path("runs"), "outputs go to <run-root>/<name>/")
    sft_dir: Path = opt(Path("runs/demo"), "own tiny stack: the demo's SFT policy is built or reused here")
    stage_timeout_s: float = opt(3600.0, cli=False)
    report_to: tuple[str, ...] = opt((), REPORT_TO_HELP.replace("the run folder's ", "<run-root>/<name>/"), cli_type=str,
                                     cli_default="none", parse=parse_report_to)  # fmt: skip

    def __post_init__(self) -> None:
        self.report_to = parse_report_to(self.report_to)
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
        if not self.methods:
            raise ValueError("no methods")
        if self.seeds < 1:
            raise ValueError("--seeds must be >= 1")


@dataclass(frozen=True)
class PolicySpec:
    label: str
    model: str
    base_url: str | None = None  # None = the rollout service


def parse_policy_spec(spec: str) -> PolicySpec:
    """``model``, ``label=model``, ``model@http://host/v1`` or ``label=model@http://host/v1``."""
    spec = spec.strip()
    head, at, base_url = spec.partition("@")
    label, _, model = head.rpartition("=")  # the label may hold '=' (the paper's "GRACE (K=250)"), model names don't
    label, model, base_url = label.strip(), model.strip(), base_url.strip()
    if not model or (at and not base_url):
        raise ValueError(f"policy {spec!r}: expected MODEL, LABEL=MODEL or LABEL=MODEL@BASE_URL")
    return PolicySpec(label=label or model, model=model, base_url=base_url or None)


def _policies(specs: list[str] | None) -> list[PolicySpec]:
    if not specs:
        raise ValueError("give at least one --policy")
    return [parse_policy_spec(p) for p in specs]


def _judge_part(value: str) -> str:
    if value not in ("answer", "full"):
        raise ValueError("answer or full")
    return value


@dataclass
class EvalOptions:
    policies: list[PolicySpec] = opt(
        ..., "repeatable: MODEL, LABEL=MODEL, or LABEL=MODEL@BASE_URL (e.g. -p Baseline=base -p 'GRACE (it 3)=v3')",
        "--policy", "-p", cli_type=list[str], cli_default=None, parse=_policies,
    )  # fmt: skip
    queries: Path = opt(Path("data/test_queries.jsonl"), "held-out split (jsonl with 'query')")
    limit: int | None = opt(None, "first N queries only")
    out_dir: Path = opt(Path("runs/default/eval"), "output folder (default: <run_root>/<run_id>/eval-<time>)", "--out",
                        cli_default=None, parse=lambda v: v or default_out("eval"))  # fmt: skip
    rollout_url: str = opt("http://127.0.0.1:8000/v1", "OpenAI base URL of the rollout service", envvar="GRACE_EVAL_ROLLOUT_URL")
    reward_url: str | None = opt("http://127.0.0.1:8100", "reward service (POST /v1/score); '' = skip",
                                 envvar="GRACE_EVAL_REWARD_URL", parse=or_none)  # fmt: skip
    judge_url: str | None = opt(None, "judge service; unset = the GRACE_JUDGE_* backend directly", envvar="GRACE_EVAL_JUDGE_URL")
    judge: bool = opt(True, "run the LLM judge (Table 2)")
    rollout_api_key: str | None = opt(
        None, "bearer key of the rollout service", envvar=["GRACE_EVAL_ROLLOUT_API_KEY", "GRACE_API_KEY"]
    )
    reward_api_key: str | None = opt(
        None, "bearer key of the reward service", envvar=["GRACE_EVAL_REWARD_API_KEY", "GRACE_API_KEY"]
    )
    judge_api_key: str | None = opt(None, "bearer key of the judge service", envvar=["GRACE_EVAL_JUDGE_API_KEY", "GRACE_API_KEY"])
    n: int = opt(1, "responses per query and policy")
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int | None = opt(
        None, "largest response, in tokens (default: the served window minus the prompt, as in sampling)"
    )
    seed: int | None = opt(0, "sampling seed (query i uses seed + i)")
    concurrency: int = opt(8, "generation requests at once")
    judge_part: str = opt("answer", "answer: judge the <answer> document when parsed; full: the whole text", parse=_judge_part)
    reference: bool = opt(False, "also evaluate the query file's 'response' field, unranked (Table 2's Labeled Answer)")
    judge_reference: bool = opt(False, "give the judge the query file's 'response' field as a reference answer")
    stages: bool = opt(False, "policies are training stages in order: figure 3 lines, not figure 1 bars")
    reward_groups_per_request: int = opt(4, "groups per /v1/score request (keep within the reward service's max_groups)",
                                         "--reward-batch")  # fmt: skip
    judge_items_per_request: int = opt(16, "items per /v1/judge/batch request", "--judge-batch")
    request_timeout_s: float = opt(3600.0, cli=False)
