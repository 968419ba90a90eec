"""shared/cli_options.py: commands generated from options dataclasses, and the contract of the commands
converted to it (flags, defaults, required-ness, help and types, snapshotted from the hand-written commands)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
import typer.main
from typer._click.core import Context
from typer.testing import CliRunner

from shared.cli_options import from_options, opt

COMMANDS = ("bench trainer", "bench chaos", "demo", "experiment", "eval", "eval context")


def contract(path: str) -> tuple[str, list[tuple]]:
    """A command's help and, per option in order: opts, secondary opts, default, required, help, shown type,
    min, max, flag, multiple, envvar, and the help line typer renders (default, range, envvar shown)."""
    from shared.cli import app

    cmd = typer.main.get_command(app)
    for word in path.split():
        cmd = cmd.commands[word]
    ctx = Context(cmd, info_name=path.split()[-1])
    params = [(p.opts, p.secondary_opts, p.default, p.required, p.help, p.display_type(ctx), p.min, p.max, p.is_flag,
               p.multiple, p.envvar, p.get_help_record(ctx)) for p in cmd.params]  # fmt: skip
    return cmd.help, params


def _text(result) -> str:
    """The output without rich's box and line breaks."""
    return " ".join(result.output.replace("\u2502", " ").split())


# ----------------------------------------------------------------------------- shared/cli_options.py itself


@dataclass
class Toy:
    out: Path = opt(..., "where it goes")
    k: int = opt(8, "queries per round", "--queries", "-k", min=1)
    limit: int | None = opt(None, "first N only")
    fast: bool = opt(False, "go fast")
    judge: bool = opt(True, "run the judge")
    only: bool = opt(False, "a flag alone", "--only")
    settings: dict = opt(help="JSON object", default_factory=dict, cli_type=str, cli_default="{}", parse=json.loads)
    seed: int = opt(7, cli=False)
    loss: str = "kto"


def toy_app() -> tuple[typer.Typer, list]:
    app, seen = typer.Typer(), []

    @app.command()
    @from_options(Toy)
    def toy(options: Toy) -> None:
        """Toy help."""
        seen.append(options)

    return app, seen


def test_a_dataclass_command_builds_the_options_object():
    app, seen = toy_app()
    argv = ["--out", "o", "-k", "3", "--limit", "5", "--fast", "--no-judge", "--only", "--settings", '{"a": 1}', "--loss", "dpo"]
    assert CliRunner().invoke(app, argv).exit_code == 0
    assert CliRunner().invoke(app, ["--out", "o"]).exit_code == 0
    assert seen == [Toy(out=Path("o"), k=3, limit=5, fast=True, judge=False, only=True, settings={"a": 1}, loss="dpo"),
                    Toy(out=Path("o"))]  # fmt: skip
    assert seen[1].seed == 7 and seen[1].settings == {}


def test_a_dataclass_command_declares_its_options_from_the_fields():
    app, _ = toy_app()
    command = typer.main.get_command(app)
    params = {p.name: p for p in command.params}
    assert command.help == "Toy help." and "seed" not in params
    assert params["out"].required and params["out"].opts == ["--out"] and params["out"].help == "where it goes"
    assert params["k"].opts == ["--queries", "-k"] and params["k"].default == 8 and params["k"].min == 1
    assert params["limit"].default is None and not params["limit"].required
    assert (params["fast"].opts, params["fast"].secondary_opts) == (["--fast"], ["--no-fast"])
    assert (params["judge"].opts, params["judge"].secondary_opts, params["judge"].default) == (["--judge"], ["--no-judge"], True)
    assert (params["only"].opts, params["only"].secondary_opts, params["only"].is_flag) == (["--only"], [], True)
    assert params["settings"].default == "{}" and params["loss"].help is None


def test_a_dataclass_command_refuses_bad_values_as_usage_errors():
    app, seen = toy_app()
    for argv, message in ((["-k", "1"], "Missing option '--out'"), (["--out", "o", "-k", "0"], "greater than or equal to 1"),
                          (["--out", "o", "--settings", "{"], "Invalid value for --settings"),
                          (["--out", "o", "--seed", "1"], "No such option")):  # fmt: skip
        result = CliRunner().invoke(app, argv)
        assert result.exit_code == 2 and message in _text(result), result.output
    assert not seen


def test_a_dataclass_callback_stays_out_of_the_way_of_its_subcommands():
    @dataclass
    class Group:
        n: int = opt(1, "n")

    app, seen = typer.Typer(), []

    @app.callback(invoke_without_command=True)
    @from_options(Group)
    def main(options: Group) -> None:
        seen.append(options)

    @app.command()
    def sub() -> None:
        seen.append("sub")

    assert CliRunner().invoke(app, ["--n", "2", "sub"]).exit_code == 0
    assert CliRunner().invoke(app, ["--n", "3"]).exit_code == 0
    assert seen == ["sub", Group(n=3)]


# The commands as written by hand with typer.Option before shared/cli_options.py (typer 0.29.2), generated once by
# printing contract(path) for each: the generated commands must equal them.
CONTRACT = {
    'bench trainer': ("One GRACE-KTO epoch vs TRL's KTOTrainer (speed, peak memory) and vs DPO (peak memory), same run.", [
        (['--preset'], [], 'small', False, 'local model preset: small (tens of M params) or tiny', '<str>', None, None, False, False, None, ('--preset <str>', 'local model preset: small (tens of M params) or tiny  [default: small]')),
        (['--samples'], [], 32, False, 'weighted samples in the epoch (groups of 8)', '<int>', None, None, False, False, None, ('--samples <int>', 'weighted samples in the epoch (groups of 8)  [default: 32]')),
        (['--batch-size'], [], 8, False, 'samples per optimizer step (paper: 8)', '<int>', None, None, False, False, None, ('--batch-size <int>', 'samples per optimizer step (paper: 8)  [default: 8]')),
        (['--min-tokens'], [], 64, False, 'shortest response, in tokens', '<int>', None, None, False, False, None, ('--min-tokens <int>', 'shortest response, in tokens  [default: 64]')),
        (['--max-tokens'], [], 640, False, 'longest response, in tokens', '<int>', None, None, False, False, None, ('--max-tokens <int>', 'longest response, in tokens  [default: 640]')),
        (['--precision'], [], 'fp32', False, 'fp32 or bf16 (the same for every method)', '<str>', None, None, False, False, None, ('--precision <str>', 'fp32 or bf16 (the same for every method)  [default: fp32]')),
        (['--lora-rank'], [], 64, False, 'LoRA rank (paper: 64)', '<int>', None, None, False, False, None, ('--lora-rank <int>', 'LoRA rank (paper: 64)  [default: 64]')),
        (['--threads'], [], 0, False, 'torch threads per method (0 = torch default)', '<int>', None, None, False, False, None, ('--threads <int>', 'torch threads per method (0 = torch default)  [default: 0]')),
        (['--micro-batch-tokens'], [], 1024, False, 'GRACE-KTO/DPO padded tokens per forward (about one long sequence)', '<int>', None, None, False, False, None, ('--micro-batch-tokens <int>', 'GRACE-KTO/DPO padded tokens per forward (about one long sequence)  [default: 1024]')),
        (['--repeats'], [], 2, False, 'alternating GRACE-KTO/TRL runs; the fastest of each counts (shared machines)', '<int>', None, None, False, False, None, ('--repeats <int>', 'alternating GRACE-KTO/TRL runs; the fastest of each counts (shared machines)  [default: 2]')),
        (['--out'], [], None, False, 'folder for bench.json and the table (default: <run_root>/bench-trainer)', '<path>', None, None, False, False, None, ('--out <path>', 'folder for bench.json and the table (default: <run_root>/bench-trainer)')),
    ]),
    'bench chaos': ('SIGKILL rollout (vLLM included), reward, trainer and Redis during a run on the tiny stack; last line JSON.', [
        (['--iterations'], [], 3, False, 'iterations of each run (the baseline and the chaos run)', '<int>', None, None, False, False, None, ('--iterations <int>', 'iterations of each run (the baseline and the chaos run)  [default: 3]')),
        (['--queries'], [], 2, False, 'K: queries per iteration', '<int>', None, None, False, False, None, ('--queries <int>', 'K: queries per iteration  [default: 2]')),
        (['--responses'], [], 2, False, 'm: responses per query', '<int>', None, None, False, False, None, ('--responses <int>', 'm: responses per query  [default: 2]')),
        (['--seed'], [], 0, False, 'seed of the fault schedule and of the runs', '<int>', None, None, False, False, None, ('--seed <int>', 'seed of the fault schedule and of the runs  [default: 0]')),
        (['--out-dir'], [], Path('runs/bench/chaos'), False, 'stack, runs, adapters and chaos.json go here', '<path>', None, None, False, False, None, ('--out-dir <path>', 'stack, runs, adapters and chaos.json go here  [default: runs/bench/chaos]')),
    ]),
    'demo': ('The whole loop on the tiny local models: SFT, stack, 3 iterations, report.', [
        (['--work-dir'], [], Path('runs/demo'), False, 'models, SFT policy, stack and runs go here', '<path>', None, None, False, False, None, ('--work-dir <path>', 'models, SFT policy, stack and runs go here  [default: runs/demo]')),
        (['--run-id'], [], None, False, 'continue this run id (default: a new one)', '<str>', None, None, False, False, None, ('--run-id <str>', 'continue this run id (default: a new one)')),
        (['--iterations'], [], 3, False, None, '<int>', None, None, False, False, None, ('--iterations <int>', '[default: 3]')),
        (['--queries', '-k'], [], 16, False, 'new queries per iteration (K)', '<int>', None, None, False, False, None, ('-k, --queries <int>', 'new queries per iteration (K)  [default: 16]')),
        (['--responses', '-m'], [], 8, False, 'responses per query (m; paper: 8)', '<int>', None, None, False, False, None, ('-m, --responses <int>', 'responses per query (m; paper: 8)  [default: 8]')),
        (['--loss'], [], 'grace_kto', False, None, '<str>', None, None, False, False, None, ('--loss <str>', '[default: grace_kto]')),
    ]),
    'experiment': ("The paper's comparison: every method, same budget, S seeds; table, paired test, figures; last line JSON.", [
        (['--name'], [], 'experiment', False, 'experiment id: outputs in <run-root>/<name>/, cells <name>-<method>-s<seed>', '<str>', None, None, False, False, None, ('--name <str>', 'experiment id: outputs in <run-root>/<name>/, cells <name>-<method>-s<seed>  [default: experiment]')),
        (['--methods'], [], 'sft,kto,dpo,orpo,grace_offline,grace,grpo', False, 'comma-separated methods', '<str>', None, None, False, False, None, ('--methods <str>', 'comma-separated methods  [default: sft,kto,dpo,orpo,grace_offline,grace,grpo]')),
        (['--seeds'], [], 3, False, 'seeds per method (S)', '<int range>', 1, None, False, False, None, ('--seeds <int range>', 'seeds per method (S)  [default: 3; x>=1]')),
        (['--total-queries', '-n'], [], 48, False, 'query budget N of every method (0: K x --iterations)', '<int range>', 0, None, False, False, None, ('-n, --total-queries <int range>', 'query budget N of every method (0: K x --iterations)  [default: 48; x>=0]')),
        (['-k'], [], 16, False, 'K queries per semi-online round: ceil(N/K) rounds', '<int>', None, None, False, False, None, ('-k <int>', 'K queries per semi-online round: ceil(N/K) rounds  [default: 16]')),
        (['-m'], [], 8, False, 'm responses per query', '<int>', None, None, False, False, None, ('-m <int>', 'm responses per query  [default: 8]')),
        (['--iterations'], [], 3, False, 'semi-online rounds when --total-queries is 0 (N = K x rounds)', '<int>', None, None, False, False, None, ('--iterations <int>', 'semi-online rounds when --total-queries is 0 (N = K x rounds)  [default: 3]')),
        (['--epochs'], [], None, False, "epochs per round (default: the trainer's setting)", '<int range>', 1, None, False, False, None, ('--epochs <int range>', "epochs per round (default: the trainer's setting)  [x>=1]")),
        (['--eval-limit'], [], 12, False, 'held-out queries evaluated per policy (0: all)', '<int>', None, None, False, False, None, ('--eval-limit <int>', 'held-out queries evaluated per policy (0: all)  [default: 12]')),
        (['--eval-n'], [], 4, False, 'samples per held-out query', '<int>', None, None, False, False, None, ('--eval-n <int>', 'samples per held-out query  [default: 4]')),
        (['--stack-dir'], [], None, False, 'use this running stack (its stack.json); default: bring up the tiny stack', '<path>', None, None, False, False, None, ('--stack-dir <path>', 'use this running stack (its stack.json); default: bring up the tiny stack')),
        (['--run-root'], [], Path('runs'), False, 'outputs go to <run-root>/<name>/', '<path>', None, None, False, False, None, ('--run-root <path>', 'outputs go to <run-root>/<name>/  [default: runs]')),
        (['--sft-dir'], [], Path('runs/demo'), False, "own tiny stack: the demo's SFT policy is built or reused here", '<path>', None, None, False, False, None, ('--sft-dir <path>', "own tiny stack: the demo's SFT policy is built or reused here  [default: runs/demo]")),
        (['--report-to'], [], 'none', False, 'also record trainer steps, iteration records and evaluation tables in: none, all, or a comma-separated list of tensorboard, mlflow, wandb (files under <run-root>/<name>/tracking/; MLflow local unless MLFLOW_TRACKING_URI is set, W&B offline unless WANDB_MODE is set)', '<str>', None, None, False, False, None, ('--report-to <str>', 'also record trainer steps, iteration records and evaluation tables in: none, all, or a comma-separated list of tensorboard, mlflow, wandb (files under <run-root>/<name>/tracking/; MLflow local unless MLFLOW_TRACKING_URI is set, W&B offline unless WANDB_MODE is set)  [default: none]')),
    ]),
    'eval': ("Evaluation: the paper's tables and z-score plots.", [
        (['--policy', '-p'], [], None, False, "repeatable: MODEL, LABEL=MODEL, or LABEL=MODEL@BASE_URL (e.g. -p Baseline=base -p 'GRACE (it 3)=v3')", '<list[str]>', None, None, False, True, None, ('-p, --policy <list[str]>', "repeatable: MODEL, LABEL=MODEL, or LABEL=MODEL@BASE_URL (e.g. -p Baseline=base -p 'GRACE (it 3)=v3')")),
        (['--queries'], [], Path('data/test_queries.jsonl'), False, "held-out split (jsonl with 'query')", '<path>', None, None, False, False, None, ('--queries <path>', "held-out split (jsonl with 'query')  [default: data/test_queries.jsonl]")),
        (['--limit'], [], None, False, 'first N queries only', '<int>', None, None, False, False, None, ('--limit <int>', 'first N queries only')),
        (['--out'], [], None, False, 'output folder (default: <run_root>/<run_id>/eval-<time>)', '<path>', None, None, False, False, None, ('--out <path>', 'output folder (default: <run_root>/<run_id>/eval-<time>)')),
        (['--rollout-url'], [], 'http://127.0.0.1:8000/v1', False, 'OpenAI base URL of the rollout service', '<str>', None, None, False, False, 'GRACE_EVAL_ROLLOUT_URL', ('--rollout-url <str>', 'OpenAI base URL of the rollout service  [env var: GRACE_EVAL_ROLLOUT_URL; default: http://127.0.0.1:8000/v1]')),
        (['--reward-url'], [], 'http://127.0.0.1:8100', False, "reward service (POST /v1/score); '' = skip", '<str>', None, None, False, False, 'GRACE_EVAL_REWARD_URL', ('--reward-url <str>', "reward service (POST /v1/score); '' = skip  [env var: GRACE_EVAL_REWARD_URL; default: http://127.0.0.1:8100]")),
        (['--judge-url'], [], None, False, 'judge service; unset = the GRACE_JUDGE_* backend directly', '<str>', None, None, False, False, 'GRACE_EVAL_JUDGE_URL', ('--judge-url <str>', 'judge service; unset = the GRACE_JUDGE_* backend directly  [env var: GRACE_EVAL_JUDGE_URL]')),
        (['--judge'], ['--no-judge'], True, False, 'run the LLM judge (Table 2)', '<bool>', None, None, True, False, None, ('--judge / --no-judge', 'run the LLM judge (Table 2)  [default: judge]')),
        (['--rollout-api-key'], [], None, False, 'bearer key of the rollout service', '<str>', None, None, False, False, ['GRACE_EVAL_ROLLOUT_API_KEY', 'GRACE_API_KEY'], ('--rollout-api-key <str>', 'bearer key of the rollout service  [env var: GRACE_EVAL_ROLLOUT_API_KEY, GRACE_API_KEY]')),
        (['--reward-api-key'], [], None, False, 'bearer key of the reward service', '<str>', None, None, False, False, ['GRACE_EVAL_REWARD_API_KEY', 'GRACE_API_KEY'], ('--reward-api-key <str>', 'bearer key of the reward service  [env var: GRACE_EVAL_REWARD_API_KEY, GRACE_API_KEY]')),
        (['--judge-api-key'], [], None, False, 'bearer key of the judge service', '<str>', None, None, False, False, ['GRACE_EVAL_JUDGE_API_KEY', 'GRACE_API_KEY'], ('--judge-api-key <str>', 'bearer key of the judge service  [env var: GRACE_EVAL_JUDGE_API_KEY, GRACE_API_KEY]')),
        (['--n'], [], 1, False, 'responses per query and policy', '<int>', None, None, False, False, None, ('--n <int>', 'responses per query and policy  [default: 1]')),
        (['--temperature'], [], 0.7, False, None, '<float>', None, None, False, False, None, ('--temperature <float>', '[default: 0.7]')),
        (['--top-p'], [], 0.95, False, None, '<float>', None, None, False, False, None, ('--top-p <float>', '[default: 0.95]')),
        (['--max-tokens'], [], None, False, 'largest response, in tokens (default: the served window minus the prompt, as in sampling)', '<int>', None, None, False, False, None, ('--max-tokens <int>', 'largest response, in tokens (default: the served window minus the prompt, as in sampling)')),
        (['--seed'], [], 0, False, 'sampling seed (query i uses seed + i)', '<int>', None, None, False, False, None, ('--seed <int>', 'sampling seed (query i uses seed + i)  [default: 0]')),
        (['--concurrency'], [], 8, False, 'generation requests at once', '<int>', None, None, False, False, None, ('--concurrency <int>', 'generation requests at once  [default: 8]')),
        (['--judge-part'], [], 'answer', False, 'answer: judge the <answer> document when parsed; full: the whole text', '<str>', None, None, False, False, None, ('--judge-part <str>', 'answer: judge the <answer> document when parsed; full: the whole text  [default: answer]')),
        (['--reference'], ['--no-reference'], False, False, "also evaluate the query file's 'response' field, unranked (Table 2's Labeled Answer)", '<bool>', None, None, True, False, None, ('--reference / --no-reference', "also evaluate the query file's 'response' field, unranked (Table 2's Labeled Answer)  [default: no-reference]")),
        (['--judge-reference'], ['--no-judge-reference'], False, False, "give the judge the query file's 'response' field as a reference answer", '<bool>', None, None, True, False, None, ('--judge-reference / --no-judge-reference', "give the judge the query file's 'response' field as a reference answer  [default: no-judge-reference]")),
        (['--stages'], ['--no-stages'], False, False, 'policies are training stages in order: figure 3 lines, not figure 1 bars', '<bool>', None, None, True, False, None, ('--stages / --no-stages', 'policies are training stages in order: figure 3 lines, not figure 1 bars  [default: no-stages]')),
        (['--reward-batch'], [], 4, False, "groups per /v1/score request (keep within the reward service's max_groups)", '<int>', None, None, False, False, None, ('--reward-batch <int>', "groups per /v1/score request (keep within the reward service's max_groups)  [default: 4]")),
        (['--judge-batch'], [], 16, False, 'items per /v1/judge/batch request', '<int>', None, None, False, False, None, ('--judge-batch <int>', 'items per /v1/judge/batch request  [default: 16]')),
    ]),
    'eval context': ('Table 3: perplexity and generated length at 1x/2x/4x the native window, per rope scaling method.', [
        (['--model'], [], None, False, 'causal LM folder (default: policy_model, else the local model_preset set)', '<str>', None, None, False, False, None, ('--model <str>', 'causal LM folder (default: policy_model, else the local model_preset set)')),
        (['--preset'], [], None, False, 'local model set when no model is given (default: model_preset)', '<tiny|small>', None, None, False, False, None, ('--preset <tiny|small>', 'local model set when no model is given (default: model_preset)')),
        (['--out'], [], None, False, 'output folder (default: <run_root>/<run_id>/context-<time>)', '<path>', None, None, False, False, None, ('--out <path>', 'output folder (default: <run_root>/<run_id>/context-<time>)')),
        (['--native-window'], [], None, False, "treat this as the native window N (default: the model's)", '<int>', None, None, False, False, None, ('--native-window <int>', "treat this as the native window N (default: the model's)")),
        (['--factors'], [], '1,2,4', False, 'windows as multiples of N', '<str>', None, None, False, False, None, ('--factors <str>', 'windows as multiples of N  [default: 1,2,4]')),
        (['--methods'], [], 'extrapolation,dynamic,yarn', False, 'extension methods', '<str>', None, None, False, False, None, ('--methods <str>', 'extension methods  [default: extrapolation,dynamic,yarn]')),
        (['--texts'], [], 2, False, 'long texts per window for perplexity', '<int>', None, None, False, False, None, ('--texts <int>', 'long texts per window for perplexity  [default: 2]')),
        (['--prompts'], [], 2, False, 'test queries for the generated length', '<int>', None, None, False, False, None, ('--prompts <int>', 'test queries for the generated length  [default: 2]')),
        (['--max-new-tokens'], [], None, False, 'cap on generated tokens (default: up to the window)', '<int>', None, None, False, False, None, ('--max-new-tokens <int>', 'cap on generated tokens (default: up to the window)')),
        (['--queries'], [], Path('data/test_queries.jsonl'), False, 'prompts for generation', '<path>', None, None, False, False, None, ('--queries <path>', 'prompts for generation  [default: data/test_queries.jsonl]')),
        (['--device'], [], 'auto', False, None, '<str>', None, None, False, False, None, ('--device <str>', '[default: auto]')),
        (['--dtype'], [], 'auto', False, 'auto | bf16 | fp32', '<str>', None, None, False, False, None, ('--dtype <str>', 'auto | bf16 | fp32  [default: auto]')),
    ]),
}  # fmt: skip


@pytest.mark.parametrize("path", COMMANDS)
def test_generated_commands_keep_the_hand_written_contract(path):
    doc, params = CONTRACT[path]
    assert contract(path) == (doc, params)


# ----------------------------------------------------------------------------- what the commands build


def _invoke(monkeypatch, module: str, name: str, argv: list[str], result=None) -> tuple[object, list]:
    """Runs `grace argv` with ``module.name`` (the function the command calls) replaced by a recorder."""
    from shared.cli import app

    seen: list = []

    def fake(options, *args, **kwargs):
        seen.append(options)
        return result(options) if callable(result) else result

    monkeypatch.setattr(f"{module}.{name}", fake)
    return CliRunner().invoke(app, argv), seen


def test_bench_trainer_and_demo_build_their_options(monkeypatch):
    from services.orchestrator.demo import DemoOptions
    from services.trainer.bench import BenchOptions

    out, seen = _invoke(monkeypatch, "services.trainer.bench", "run_bench", ["bench", "trainer", "--samples", "16", "--out", "o"])
    assert out.exit_code == 0, out.output
    assert seen == [BenchOptions(samples=16, out=Path("o"))]
    out, seen = _invoke(monkeypatch, "services.orchestrator.demo", "run_demo", ["demo", "-k", "4", "-m", "2", "--run-id", "x"])
    assert out.exit_code == 0, out.output
    assert seen == [DemoOptions(run_id="x", queries=4, responses=2)]


def test_experiment_parses_its_string_options(monkeypatch):
    from services.orchestrator.experiment import ExperimentOptions

    argv = ["experiment", "--methods", "sft, grace", "-n", "0", "--eval-limit", "0", "-k", "2", "--stack-dir", "s"]
    out, seen = _invoke(monkeypatch, "services.orchestrator.experiment", "run_experiment", argv, {"ok": 1})
    assert out.exit_code == 0, out.output
    assert json.loads(out.output.splitlines()[-1]) == {"ok": 1}
    assert seen == [ExperimentOptions(methods=("sft", "grace"), total_queries=None, eval_limit=None, k=2, stack_dir=Path("s"))]
    out, seen = _invoke(monkeypatch, "services.orchestrator.experiment", "run_experiment", ["experiment"], {})
    assert seen == [ExperimentOptions()] and seen[0].report_to == ()


def test_chaos_builds_its_options_and_refuses_a_group_of_one(monkeypatch):
    from services.orchestrator.chaos import ChaosOptions

    summary = {"lost": 0, "duplicated": 0, "iterations_completed": 2}
    out, seen = _invoke(monkeypatch, "services.orchestrator.chaos", "run_chaos", ["bench", "chaos", "--iterations", "2"], summary)
    assert out.exit_code == 0, out.output
    assert seen == [ChaosOptions(out_dir=Path("runs/bench/chaos"), iterations=2)]
    out, seen = _invoke(monkeypatch, "services.orchestrator.chaos", "run_chaos", ["bench", "chaos", "--responses", "1"], summary)
    assert out.exit_code == 2 and "--responses >= 2" in _text(out) and not seen


def test_eval_builds_its_options_and_refuses_bad_values(monkeypatch, tmp_path):
    from services.orchestrator.evaluation import EvalOptions, PolicySpec

    argv = ["eval", "-p", "B=base", "-p", "x@http://h/v1", "--out", str(tmp_path), "--reward-url", "", "--reward-batch", "3",
            "--judge-batch", "5", "--no-judge", "--reference", "--seed", "7"]  # fmt: skip
    out, seen = _invoke(monkeypatch, "services.orchestrator.evaluation", "run_eval", argv)
    assert out.exit_code == 0, out.output
    assert seen == [EvalOptions(policies=[PolicySpec("B", "base"), PolicySpec("x", "x", "http://h/v1")], out_dir=tmp_path,
                                reward_url=None, reward_groups_per_request=3, judge_items_per_request=5, judge=False,
                                reference=True, seed=7)]  # fmt: skip
    out, seen = _invoke(monkeypatch, "services.orchestrator.evaluation", "run_eval", ["eval", "-p", "base"])
    assert out.exit_code == 0 and seen[0].out_dir.name.startswith("eval-"), out.output
    for argv, message in ((["eval"], "give at least one --policy"), (["eval", "-p", "a@"], "expected MODEL"),
                          (["eval", "-p", "a", "--judge-part", "x"], "answer or full")):  # fmt: skip
        out, seen = _invoke(monkeypatch, "services.orchestrator.evaluation", "run_eval", argv)
        assert out.exit_code == 2 and message in _text(out) and not seen, out.output


def test_eval_context_builds_its_options_and_refuses_bad_values(monkeypatch, tmp_path):
    from services.judge.config import JudgeSettings
    from services.orchestrator.context import ContextOptions

    def write(options):
        (options.out_dir / "context.md").write_text("| table |")

    argv = ["eval", "context", "--model", "m", "--out", str(tmp_path), "--factors", "1, 2", "--methods", "yarn", "--texts", "1"]
    out, seen = _invoke(monkeypatch, "services.orchestrator.context", "run_context", argv, write)
    assert out.exit_code == 0 and "| table |" in out.output, out.output
    assert seen == [
        ContextOptions(
            model="m", out_dir=tmp_path, factors=[1.0, 2.0], methods=["yarn"], texts=1, queries=Path("data/test_queries.jsonl")
        )
    ]  # the CLI default, not DATA_DIR
    argv = ["eval", "context", "--preset", "tiny", "--out", str(tmp_path)]
    out, seen = _invoke(monkeypatch, "services.orchestrator.context", "run_context", argv, write)
    assert out.exit_code == 0, out.output
    assert seen[0].model == JudgeSettings(model_preset="tiny").policy_path()
    assert seen[0].factors == [1.0, 2.0, 4.0] and seen[0].methods == ["extrapolation", "dynamic", "yarn"]
    for argv, message in ((["--methods", "yarn,bogus"], "unknown ['bogus']; choose from extrapolation, dynamic, yarn"),
                          (["--factors", "1,x"], "could not convert"), (["--preset", "huge"], "huge")):  # fmt: skip
        out, seen = _invoke(
            monkeypatch, "services.orchestrator.context", "run_context", ["eval", "context", "--model", "m", *argv]
        )
        assert out.exit_code == 2 and message in _text(out) and not seen, out.output
