"""shared/cli_options.py: commands generated from options dataclasses, and the contract of the commands
converted to it (flags, defaults, required-ness, help and types, snapshotted from the hand-written commands)."""

from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import typer
import typer.main
from typer._click.core import Context
from typer.testing import CliRunner

from shared.cli_options import from_options, opt


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
    'sft': ('Supervised fine-tuning under the 3.1 system prompt (loss on response tokens): the starting policy.\n\nThe last stdout line is the summary as JSON (tag rate, rounds, steps, final loss).', [
        (['--data'], [], Path('data/sft.jsonl'), False, "jsonl with 'query' and a tagged 'response'", '<path>', None, None, False, False, None, ('--data <path>', "jsonl with 'query' and a tagged 'response'  [default: data/sft.jsonl]")),
        (['--out'], [], None, True, 'folder of the starting policy (merged model + tokenizer, safetensors)', '<path>', None, None, False, False, None, ('--out <path>', 'folder of the starting policy (merged model + tokenizer, safetensors)  [required]')),
        (['--base'], [], None, False, 'base model folder (default: GRACE_TRAINER_POLICY_MODEL or the tiny policy)', '<str>', None, None, False, False, None, ('--base <str>', 'base model folder (default: GRACE_TRAINER_POLICY_MODEL or the tiny policy)')),
        (['--mode'], [], 'full', False, "full (all parameters, the paper's SFT) or lora (merged after training)", '<str>', None, None, False, False, None, ('--mode <str>', "full (all parameters, the paper's SFT) or lora (merged after training)  [default: full]")),
        (['--epochs'], [], None, False, 'passes over the data (default: 1 as the paper; 50 for models under 10M parameters)', '<int>', None, None, False, False, None, ('--epochs <int>', 'passes over the data (default: 1 as the paper; 50 for models under 10M parameters)')),
        (['--lr'], [], None, False, 'peak learning rate (default: 1e-6 full / 1e-4 LoRA as the paper; 1e-2 under 10M parameters)', '<float>', None, None, False, False, None, ('--lr <float>', 'peak learning rate (default: 1e-6 full / 1e-4 LoRA as the paper; 1e-2 under 10M parameters)')),
        (['--max-steps'], [], None, False, 'stop after this many optimizer steps', '<int>', None, None, False, False, None, ('--max-steps <int>', 'stop after this many optimizer steps')),
        (['--batch-size'], [], None, False, 'examples per step (default: 8; 4 under 10M parameters)', '<int>', None, None, False, False, None, ('--batch-size <int>', 'examples per step (default: 8; 4 under 10M parameters)')),
        (['--max-length'], [], 2048, False, 'longest example in tokens (longer responses are cut)', '<int>', None, None, False, False, None, ('--max-length <int>', 'longest example in tokens (longer responses are cut)  [default: 2048]')),
        (['--section-tokens'], [], None, False, 'cut each tagged section to N tokens (0 = off; default: 16 for models under 10M parameters, else off)', '<int>', None, None, False, False, None, ('--section-tokens <int>', 'cut each tagged section to N tokens (0 = off; default: 16 for models under 10M parameters, else off)')),
        (['--answer-tokens'], [], None, False, 'cut answers to a random length up to N tokens, >= --section-tokens (default: off; 128 under 10M parameters)', '<int>', None, None, False, False, None, ('--answer-tokens <int>', 'cut answers to a random length up to N tokens, >= --section-tokens (default: off; 128 under 10M parameters)')),
        (['--tag-weight'], [], None, False, 'loss weight of the structure tags (default: 1; 5 under 10M parameters)', '<float>', None, None, False, False, None, ('--tag-weight <float>', 'loss weight of the structure tags (default: 1; 5 under 10M parameters)')),
        (['--target-tag-rate'], [], None, False, 'train in rounds until this share of sampled seed-query answers parses (default: off; 0.9 under 10M parameters)', '<float>', None, None, False, False, None, ('--target-tag-rate <float>', 'train in rounds until this share of sampled seed-query answers parses (default: off; 0.9 under 10M parameters)')),
        (['--max-rounds'], [], None, False, 'most rounds of --epochs epochs (default: 1; 2 under 10M parameters)', '<int>', None, None, False, False, None, ('--max-rounds <int>', 'most rounds of --epochs epochs (default: 1; 2 under 10M parameters)')),
        (['--query-generation-examples'], [], None, False, "3.2 query-generation turns per epoch (default: 0; 4 under 10M parameters, the demo's generator)", '<int>', None, None, False, False, None, ('--query-generation-examples <int>', "3.2 query-generation turns per epoch (default: 0; 4 under 10M parameters, the demo's generator)")),
        (['--seed'], [], 0, False, None, '<int>', None, None, False, False, None, ('--seed <int>', '[default: 0]')),
        (['--rope'], [], None, False, 'the run\'s RoPE setting to check against, as JSON ({"yarn_factor", "native_window", "scope"})', '<str>', None, None, False, False, None, ('--rope <str>', 'the run\'s RoPE setting to check against, as JSON ({"yarn_factor", "native_window", "scope"})')),
    ]),
    'run': ('A semi-online GRACE-KTO run on a running stack; writes runs/<id>/report.md.', [
        (['--run-id'], [], None, True, 'run id; the same id continues an interrupted run', '<str>', None, None, False, False, None, ('--run-id <str>', 'run id; the same id continues an interrupted run  [required]')),
        (['--iterations'], [], 3, False, 'semi-online iterations (ignored with --total-queries)', '<int>', None, None, False, False, None, ('--iterations <int>', 'semi-online iterations (ignored with --total-queries)  [default: 3]')),
        (['--queries', '-k'], [], 8, False, 'K new queries per iteration (paper: 250 or 500)', '<int>', None, None, False, False, None, ('-k, --queries <int>', 'K new queries per iteration (paper: 250 or 500)  [default: 8]')),
        (['--total-queries', '-n'], [], None, False, 'query budget N (paper: 1000): ceil(N/K) iterations; offline: all N at once', '<int range>', 1, None, False, False, None, ('-n, --total-queries <int range>', 'query budget N (paper: 1000): ceil(N/K) iterations; offline: all N at once  [x>=1]')),
        (['--responses', '-m'], [], 8, False, 'm responses per query (paper: 8)', '<int>', None, None, False, False, None, ('-m, --responses <int>', 'm responses per query (paper: 8)  [default: 8]')),
        (['--loss'], [], 'grace_kto', False, 'grace_kto, or a baseline: kto, dpo, orpo, sft, grpo', '<str>', None, None, False, False, None, ('--loss <str>', 'grace_kto, or a baseline: kto, dpo, orpo, sft, grpo  [default: grace_kto]')),
        (['--offline'], [], False, False, 'GRACE (offline): N queries generated once, sampled once from the starting policy, calibrated as one dataset, trained --epochs epochs', '<bool>', None, None, True, False, None, ('--offline', 'GRACE (offline): N queries generated once, sampled once from the starting policy, calibrated as one dataset, trained --epochs epochs')),
        (['--epochs'], [], None, False, "epochs per round (default: the trainer's setting, 1)", '<int range>', 1, None, False, False, None, ('--epochs <int range>', "epochs per round (default: the trainer's setting, 1)  [x>=1]")),
        (['--stack-dir'], [], Path('runs/stack'), False, 'folder of the running stack (its stack.json)', '<path>', None, None, False, False, None, ('--stack-dir <path>', 'folder of the running stack (its stack.json)  [default: runs/stack]')),
        (['--run-root'], [], Path('runs'), False, 'the run folder is <run-root>/<run-id>', '<path>', None, None, False, False, None, ('--run-root <path>', 'the run folder is <run-root>/<run-id>  [default: runs]')),
        (['--eval-limit'], [], 8, False, 'held-out requests evaluated per iteration', '<int>', None, None, False, False, None, ('--eval-limit <int>', 'held-out requests evaluated per iteration  [default: 8]')),
        (['--judge'], ['--no-judge'], False, False, 'also judge the held-out responses with the judge service', '<bool>', None, None, True, False, None, ('--judge / --no-judge', 'also judge the held-out responses with the judge service  [default: no-judge]')),
        (['--report-to'], [], 'none', False, "also record trainer steps, iteration records and evaluation tables in: none, all, or a comma-separated list of tensorboard, mlflow, wandb (files under the run folder's tracking/; MLflow local unless MLFLOW_TRACKING_URI is set, W&B offline unless WANDB_MODE is set)", '<str>', None, None, False, False, None, ('--report-to <str>', "also record trainer steps, iteration records and evaluation tables in: none, all, or a comma-separated list of tensorboard, mlflow, wandb (files under the run folder's tracking/; MLflow local unless MLFLOW_TRACKING_URI is set, W&B offline unless WANDB_MODE is set)  [default: none]")),
        (['--max-staleness'], [], 0, False, 'adapter versions a trained sample may lag behind the on-policy one (0: on-policy, as the paper; -1: any)', '<int range>', -1, None, False, False, None, ('--max-staleness <int range>', 'adapter versions a trained sample may lag behind the on-policy one (0: on-policy, as the paper; -1: any)  [default: 0; x>=-1]')),
    ]),
    'bench reward': ('Service scoring path vs the script a user would write (fp32 padded perplexity + FlagEmbedding compute_score);\nwith --load, throughput, latency and 503s of C clients for T seconds, with no answer lost or duplicated.', [
        (['--queries'], [], 2, False, 'queries (x m responses each) in the workload; with --load, per request', '<int range>', 1, None, False, False, None, ('--queries <int range>', 'queries (x m responses each) in the workload; with --load, per request  [default: 2; x>=1]')),
        (['--responses'], [], 8, False, 'm: responses per query', '<int range>', 2, None, False, False, None, ('--responses <int range>', 'm: responses per query  [default: 8; x>=2]')),
        (['--preset'], [], None, False, 'model preset (default: small, tens of millions of params; tiny with --load)', '<str>', None, None, False, False, None, ('--preset <str>', 'model preset (default: small, tens of millions of params; tiny with --load)')),
        (['--max-doc-tokens'], [], 2600, False, 'longest document, in tokens (> the 2048 window)', '<int>', None, None, False, False, None, ('--max-doc-tokens <int>', 'longest document, in tokens (> the 2048 window)  [default: 2600]')),
        (['--models'], [], None, False, 'an already built model set folder (default: the cached preset set)', '<path>', None, None, False, False, None, ('--models <path>', 'an already built model set folder (default: the cached preset set)')),
        (['--dtype'], [], 'auto', False, 'service path dtype: auto (bf16 where the CPU has it), bf16, fp32', '<str>', None, None, False, False, None, ('--dtype <str>', 'service path dtype: auto (bf16 where the CPU has it), bf16, fp32  [default: auto]')),
        (['--threads'], [], 1, False, 'torch threads for both paths and the matmul bound (0 = torch default); on a shared machine 1 avoids OpenMP threads waiting on a preempted peer', '<int range>', 0, None, False, False, None, ('--threads <int range>', 'torch threads for both paths and the matmul bound (0 = torch default); on a shared machine 1 avoids OpenMP threads waiting on a preempted peer  [default: 1; x>=0]')),
        (['--out-dir'], [], None, False, 'run folder for the table and JSON (default: runs/bench-reward-<time>)', '<path>', None, None, False, False, None, ('--out-dir <path>', 'run folder for the table and JSON (default: runs/bench-reward-<time>)')),
        (['--seed'], [], 0, False, None, '<int>', None, None, False, False, None, ('--seed <int>', '[default: 0]')),
        (['--load'], [], False, False, 'load test: concurrent clients against POST /v1/score', '<bool>', None, None, True, False, None, ('--load', 'load test: concurrent clients against POST /v1/score')),
        (['--clients'], [], 8, False, '--load: concurrent clients (C)', '<int range>', 1, None, False, False, None, ('--clients <int range>', '--load: concurrent clients (C)  [default: 8; x>=1]')),
        (['--seconds'], [], 30.0, False, '--load: seconds new requests are started (T)', '<float range>', 0.1, None, False, False, None, ('--seconds <float range>', '--load: seconds new requests are started (T)  [default: 30.0; x>=0.1]')),
        (['--url'], [], None, False, '--load: reward service to load (default: start one, small admission limits)', '<str>', None, None, False, False, None, ('--url <str>', '--load: reward service to load (default: start one, small admission limits)')),
        (['--api-key'], [], None, False, '--load: bearer key for --url', '<str>', None, None, False, False, 'GRACE_REWARD_API_KEY', ('--api-key <str>', '--load: bearer key for --url  [env var: GRACE_REWARD_API_KEY]')),
    ]),
    'plan': ('Capacity plan per iteration: stage times, memory per service, the best GPU split. Last line: JSON.', [
        (['--policy'], [], 'qwen2.5-7b', False, 'policy: a config.json folder, a preset (qwen2.5-7b, qwen2.5-1.5b, qwen2.5-0.5b, llama-3.1-8b) or tiny/small (the local model set)', '<str>', None, None, False, False, None, ('--policy <str>', 'policy: a config.json folder, a preset (qwen2.5-7b, qwen2.5-1.5b, qwen2.5-0.5b, llama-3.1-8b) or tiny/small (the local model set)  [default: qwen2.5-7b]')),
        (['--general'], [], None, False, "M_G (default: the policy's spec)", '<str>', None, None, False, False, None, ('--general <str>', "M_G (default: the policy's spec)")),
        (['--domain'], [], None, False, "M_D (default: the policy's spec)", '<str>', None, None, False, False, None, ('--domain <str>', "M_D (default: the policy's spec)")),
        (['--encoder'], [], None, False, "BGE-M3-format encoder (default: bge-m3, or the local set's)", '<str>', None, None, False, False, None, ('--encoder <str>', "BGE-M3-format encoder (default: bge-m3, or the local set's)")),
        (['-k', '--queries'], [], 250, False, 'K queries per iteration (paper: 250 or 500)', '<int range>', 1, None, False, False, None, ('-k, --queries <int range>', 'K queries per iteration (paper: 250 or 500)  [default: 250; x>=1]')),
        (['-m', '--responses'], [], 8, False, 'm responses per query (paper: 8)', '<int range>', 1, None, False, False, None, ('-m, --responses <int range>', 'm responses per query (paper: 8)  [default: 8; x>=1]')),
        (['--total-queries', '-n'], [], 1000, False, 'query budget N: ceil(N/K) iterations', '<int range>', 1, None, False, False, None, ('-n, --total-queries <int range>', 'query budget N: ceil(N/K) iterations  [default: 1000; x>=1]')),
        (['--prompt-tokens'], [], 400, False, 'mean prompt: system prompt + query', '<int range>', 1, None, False, False, None, ('--prompt-tokens <int range>', 'mean prompt: system prompt + query  [default: 400; x>=1]')),
        (['--doc-tokens'], [], 5400, False, 'mean document (<answer>) tokens', '<int range>', 1, None, False, False, None, ('--doc-tokens <int range>', 'mean document (<answer>) tokens  [default: 5400; x>=1]')),
        (['--summary-tokens'], [], 300, False, 'mean <summary> + <outline> tokens around the document', '<int range>', 0, None, False, False, None, ('--summary-tokens <int range>', 'mean <summary> + <outline> tokens around the document  [default: 300; x>=0]')),
        (['--lora-rank'], [], 64, False, 'LoRA rank r (paper: 64)', '<int range>', 1, None, False, False, None, ('--lora-rank <int range>', 'LoRA rank r (paper: 64)  [default: 64; x>=1]')),
        (['--qlora'], ['--no-qlora'], True, False, '4-bit nf4 base weights in the trainer (paper: yes)', '<bool>', None, None, True, False, None, ('--qlora / --no-qlora', '4-bit nf4 base weights in the trainer (paper: yes)  [default: qlora]')),
        (['--checkpointing'], ['--no-checkpointing'], True, False, 'gradient checkpointing', '<bool>', None, None, True, False, None, ('--checkpointing / --no-checkpointing', 'gradient checkpointing  [default: checkpointing]')),
        (['--epochs'], [], 1, False, 'epochs per iteration', '<int range>', 1, None, False, False, None, ('--epochs <int range>', 'epochs per iteration  [default: 1; x>=1]')),
        (['--eval-queries'], [], 8, False, 'held-out queries evaluated per iteration', '<int range>', 0, None, False, False, None, ('--eval-queries <int range>', 'held-out queries evaluated per iteration  [default: 8; x>=0]')),
        (['--gpu'], [], 'h200', False, 'h200 | h100 | a100 | l40s | cpu (this machine, measured now)', '<str>', None, None, False, False, None, ('--gpu <str>', 'h200 | h100 | a100 | l40s | cpu (this machine, measured now)  [default: h200]')),
        (['--gpus'], [], 8, False, 'GPUs on the node, split among rollout / reward / trainer', '<int range>', 1, None, False, False, None, ('--gpus <int range>', 'GPUs on the node, split among rollout / reward / trainer  [default: 8; x>=1]')),
        (['--split'], [], None, False, 'fixed split ROLLOUT,REWARD,TRAINER (default: the fastest)', '<str>', None, None, False, False, None, ('--split <str>', 'fixed split ROLLOUT,REWARD,TRAINER (default: the fastest)')),
        (['--peak-tflops'], [], None, False, 'custom device: dense bf16 TFLOP/s', '<float>', None, None, False, False, None, ('--peak-tflops <float>', 'custom device: dense bf16 TFLOP/s')),
        (['--bandwidth-gbs'], [], None, False, 'custom device: memory bandwidth, GB/s', '<float>', None, None, False, False, None, ('--bandwidth-gbs <float>', 'custom device: memory bandwidth, GB/s')),
        (['--memory-gb'], [], None, False, 'custom device: memory per GPU, GB', '<float>', None, None, False, False, None, ('--memory-gb <float>', 'custom device: memory per GPU, GB')),
        (['--measure-cpu'], [], False, False, 'measure this CPU (matmul FLOP/s, copy bandwidth) and plan on it', '<bool>', None, None, True, False, None, ('--measure-cpu', 'measure this CPU (matmul FLOP/s, copy bandwidth) and plan on it')),
        (['--demo'], [], False, False, 'the setting of `grace demo` (tiny set, K=16, m=8, 3 iterations) on this CPU', '<bool>', None, None, True, False, None, ('--demo', 'the setting of `grace demo` (tiny set, K=16, m=8, 3 iterations) on this CPU')),
        (['--compare'], [], None, False, 'a run folder (or its metrics.jsonl): measured / predicted iteration time', '<path>', None, None, False, False, None, ('--compare <path>', 'a run folder (or its metrics.jsonl): measured / predicted iteration time')),
        (['--out'], [], None, False, 'also write the Markdown table here', '<path>', None, None, False, False, None, ('--out <path>', 'also write the Markdown table here')),
    ]),
    'stack up': ('Start the stack, print its URLs, restart services that die; Ctrl-C stops everything.', [
        (['--stack-dir'], [], Path('runs/stack'), False, 'settings, logs, Redis data and stack.json go here', '<path>', None, None, False, False, None, ('--stack-dir <path>', 'settings, logs, Redis data and stack.json go here  [default: runs/stack]')),
        (['--services'], [], 'rollout,reward,trainer,judge', False, 'comma-separated services to start', '<str>', None, None, False, False, None, ('--services <str>', 'comma-separated services to start  [default: rollout,reward,trainer,judge]')),
        (['--policy-model'], [], None, False, 'policy model folder (default: settings / tiny set)', '<str>', None, None, False, False, None, ('--policy-model <str>', 'policy model folder (default: settings / tiny set)')),
        (['--adapter-root'], [], None, False, 'adapter store (default: <stack-dir>/adapters)', '<path>', None, None, False, False, None, ('--adapter-root <path>', 'adapter store (default: <stack-dir>/adapters)')),
        (['--run-root'], [], None, False, 'run folders (default: runs)', '<path>', None, None, False, False, None, ('--run-root <path>', 'run folders (default: runs)')),
        (['--rollout-replicas'], [], 1, False, 'rollout services, each with its own vLLM; runs spread sampling over them', '<int range>', 1, None, False, False, None, ('--rollout-replicas <int range>', 'rollout services, each with its own vLLM; runs spread sampling over them  [default: 1; x>=1]')),
    ]),
    'rollout-iteration': ('Runs one rollout worker iteration: plan K queries, sample m responses each, publish the groups.', [
        (['--iteration'], [], None, True, 'iteration number', '<int>', None, None, False, False, None, ('--iteration <int>', 'iteration number  [required]')),
        (['--run-id'], [], None, False, 'run id (default: settings.run_id)', '<str>', None, None, False, False, None, ('--run-id <str>', 'run id (default: settings.run_id)')),
        (['--k'], [], None, False, "K queries (default: the run's config, else settings)", '<int>', None, None, False, False, None, ('--k <int>', "K queries (default: the run's config, else settings)")),
        (['--m'], [], None, False, "m responses per query (default: the run's config, else settings)", '<int>', None, None, False, False, None, ('--m <int>', "m responses per query (default: the run's config, else settings)")),
        (['--offline'], ['--online'], None, False, 'the offline round: K queries generated once (source offline)', '<bool>', None, None, True, False, None, ('--offline / --online', 'the offline round: K queries generated once (source offline)')),
        (['--gateway-url'], [], None, False, 'rollout gateway URL (default: settings.gateway_url)', '<str>', None, None, False, False, None, ('--gateway-url <str>', 'rollout gateway URL (default: settings.gateway_url)')),
    ]),
    'serve reward': ('Reward service: scoring API (+ the rollouts-stream worker when Redis is configured).', [
        (['--host'], [], None, False, 'bind address (default: settings, 127.0.0.1)', '<str>', None, None, False, False, None, ('--host <str>', 'bind address (default: settings, 127.0.0.1)')),
        (['--port'], [], None, False, 'port (default: settings, 8100)', '<int>', None, None, False, False, None, ('--port <int>', 'port (default: settings, 8100)')),
        (['--no-worker'], [], False, False, 'HTTP API only, no rollouts-stream worker', '<bool>', None, None, True, False, None, ('--no-worker', 'HTTP API only, no rollouts-stream worker')),
        (['--worker-only'], [], False, False, 'the rollouts-stream worker only, no HTTP', '<bool>', None, None, True, False, None, ('--worker-only', 'the rollouts-stream worker only, no HTTP')),
    ]),
    'bench rollout': ('Service (gateway + adapter) vs raw vLLM vs transformers generate; hot-swap latency. Last line: JSON.', [
        (['--presets'], [], 'tiny,small', False, 'comma-separated local model presets to measure', '<str>', None, None, False, False, None, ('--presets <str>', 'comma-separated local model presets to measure  [default: tiny,small]')),
        (['--queries'], [], 8, False, 'K queries of the workload', '<int>', None, None, False, False, None, ('--queries <int>', 'K queries of the workload  [default: 8]')),
        (['--responses'], [], 4, False, 'm responses per query', '<int>', None, None, False, False, None, ('--responses <int>', 'm responses per query  [default: 4]')),
        (['--min-tokens'], [], 64, False, 'shortest response (tokens)', '<int>', None, None, False, False, None, ('--min-tokens <int>', 'shortest response (tokens)  [default: 64]')),
        (['--max-tokens'], [], 256, False, 'longest response (tokens); lengths vary between the two', '<int>', None, None, False, False, None, ('--max-tokens <int>', 'longest response (tokens); lengths vary between the two  [default: 256]')),
        (['--repeats'], [], 3, False, 'timed (service, raw vLLM) pass pairs; medians count', '<int>', None, None, False, False, None, ('--repeats <int>', 'timed (service, raw vLLM) pass pairs; medians count  [default: 3]')),
        (['--out-dir'], [], Path('runs/bench/rollout'), False, 'table, plot and JSON go here', '<path>', None, None, False, False, None, ('--out-dir <path>', 'table, plot and JSON go here  [default: runs/bench/rollout]')),
    ]),
}  # fmt: skip


@pytest.mark.parametrize("path", CONTRACT)
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


def test_sft_builds_its_options_and_prints_its_summary(monkeypatch):
    from services.trainer.sft import SftOptions
    from shared.rope import RopeConfig

    summary = {"out": "o", "steps": 3, "rounds": [{}], "final_loss": 0.5, "tag_rate": 0.75}
    argv = ["sft", "--out", "o", "--mode", "lora", "--epochs", "2", "--rope", '{"yarn_factor": 2, "scope": "inference"}']
    out, seen = _invoke(monkeypatch, "services.trainer.sft", "run_sft", argv, summary)
    assert out.exit_code == 0, out.output
    assert seen == [SftOptions(out=Path("o"), mode="lora", epochs=2, rope=RopeConfig(yarn_factor=2.0))]
    assert out.output.splitlines()[-2:] == ["policy o steps=3 rounds=1 final_loss=0.5000 tag_rate=0.75", json.dumps(summary)]
    out, seen = _invoke(monkeypatch, "services.trainer.sft", "run_sft", ["sft", "--out", "o"], {**summary, "tag_rate": None})
    assert out.exit_code == 0 and seen == [SftOptions(out=Path("o"))] and seen[0].rope is None, out.output
    out, seen = _invoke(monkeypatch, "services.trainer.sft", "run_sft", ["sft", "--out", "o", "--rope", '{"yarn_factor": 0}'])
    assert out.exit_code == 2 and "Invalid value for --rope" in _text(out) and not seen, out.output


def test_run_builds_the_loops_options(monkeypatch):
    from services.orchestrator.options import RunCommandOptions

    monkeypatch.setattr("services.orchestrator.stack.StackInfo.load", lambda path: path)
    started = lambda options: SimpleNamespace(run=lambda: None)  # noqa: E731
    argv = ["run", "--run-id", "r", "-n", "20", "--loss", "kto", "--epochs", "2", "--judge", "--run-root", "rr"]
    out, seen = _invoke(monkeypatch, "services.orchestrator.loop", "SemiOnlineRun", argv, started)
    assert out.exit_code == 0, out.output
    cli = RunCommandOptions(run_id="r", total_queries=20, loss="kto", epochs=2, judge=True, run_root=Path("rr"))
    assert seen == [cli.run_options()]
    config = seen[0].config
    assert (config.iterations, config.queries_per_iteration, config.total_queries, config.loss) == (3, 8, 20, "kto")
    assert seen[0].run_dir == Path("rr/r") and seen[0].judge and seen[0].tracking.report_to == ()
    assert config.max_staleness == 0  # on-policy, as the paper
    for flag, staleness in (("2", 2), ("-1", None)):
        out, seen = _invoke(monkeypatch, "services.orchestrator.loop", "SemiOnlineRun",
                            ["run", "--run-id", "r", "--max-staleness", flag], started)  # fmt: skip
        assert out.exit_code == 0 and seen[0].config.max_staleness == staleness, out.output
    out, seen = _invoke(monkeypatch, "services.orchestrator.loop", "SemiOnlineRun", ["run", "--run-id", "r", "-n", "0"])
    assert out.exit_code == 2 and not seen, out.output


def test_stack_up_builds_its_stack_config(monkeypatch):
    from services.orchestrator.stack import StackConfig

    class Stack:
        dir = Path("s")

        def up(self):
            return SimpleNamespace(urls={"rollout": "http://r"}, rollout_urls=["http://r", "http://r2"], redis_url="redis://x")

        def supervise(self):
            pass

        def down(self):
            pass

    argv = ["stack", "up", "--stack-dir", "s", "--services", "rollout, reward", "--policy-model", "p", "--rollout-replicas", "2"]
    out, seen = _invoke(monkeypatch, "services.orchestrator.stack", "LocalStack", argv, lambda config: Stack())
    assert out.exit_code == 0 and "rollout-2 http://r2" in out.output, out.output
    common = {"adapter_root": str(Path("s/adapters").resolve()), "run_root": str(Path("runs").resolve()), "policy_model": "p"}
    assert seen == [StackConfig(stack_dir=Path("s"), services=("rollout", "reward"), common=common, rollout_replicas=2)]
    out, seen = _invoke(monkeypatch, "services.orchestrator.stack", "LocalStack", ["stack", "up", "--rollout-replicas", "0"])
    assert out.exit_code == 2 and not seen, out.output


def test_rollout_iteration_passes_its_options_on(monkeypatch):
    from shared.cli import app

    calls = []

    async def run_iteration(settings, client, iteration, **kwargs):
        calls.append((settings.run_id, settings.gateway_url, client, iteration, kwargs))
        return SimpleNamespace(published=1)

    monkeypatch.setattr("services.orchestrator.rollout.run_iteration", run_iteration)
    monkeypatch.setattr("shared.local_redis.connect", lambda url: "redis")
    argv = ["rollout-iteration", "--iteration", "2", "--run-id", "r", "--k", "3", "--online", "--gateway-url", "http://g"]
    out = CliRunner().invoke(app, argv)
    assert out.exit_code == 0 and json.loads(out.output.splitlines()[-1]) == {"published": 1}, out.output
    assert calls == [("r", "http://g", "redis", 2, {"k": 3, "m": None, "offline": False})]
    assert CliRunner().invoke(app, ["rollout-iteration"]).exit_code == 2 and len(calls) == 1  # --iteration is required


def test_plan_builds_its_inputs_and_refuses_a_bad_split(monkeypatch):
    from services.orchestrator import plan as P
    from shared.cli import app

    real, seen = P.make_plan, []
    monkeypatch.setattr(P, "make_plan", lambda inputs, split: seen.append((inputs, split)) or real(inputs, split))
    argv = ["plan", "--gpu", "H100", "--gpus", "4", "-k", "16", "--no-checkpointing", "--split", "1,1,2", "--doc-tokens", "900"]
    out = CliRunner().invoke(app, argv)
    assert out.exit_code == 0 and "| stage | GPUs | time |" in out.output, out.output
    ((inputs, split),) = seen
    assert split == (1, 1, 2) and inputs.device == P.DEVICES["h100"] and inputs.policy == P.load_shape("qwen2.5-7b", "policy")
    assert (inputs.k, inputs.m, inputs.gpus, inputs.doc_tokens) == (16, 8, 4, 900) and inputs.qlora
    assert not inputs.gradient_checkpointing
    for argv, message in ((["--split", "1,2"], "Invalid value for --split: ROLLOUT,REWARD,TRAINER, e.g. 2,2,4"),
                          (["--gpu", "tpu"], "Invalid value for --gpu: choose from h100")):  # fmt: skip
        out = CliRunner().invoke(app, ["plan", *argv])
        assert out.exit_code == 2 and message in _text(out), out.output
    assert len(seen) == 1


def test_bench_reward_builds_its_options(monkeypatch):
    from services.reward.options import RewardBenchOptions
    from shared.cli import app

    monkeypatch.delenv("GRACE_REWARD_API_KEY", raising=False)
    seen: list = []
    bench = types.ModuleType("services.reward.bench")  # the real one imports torch
    bench.run_bench = seen.append
    monkeypatch.setitem(sys.modules, "services.reward.bench", bench)
    out = CliRunner().invoke(app, ["bench", "reward", "--queries", "1", "--models", "m", "--threads", "0"])
    assert out.exit_code == 0, out.output
    argv = ["bench", "reward", "--load", "--clients", "2", "--url", "http://r", "--api-key", "k"]
    out, loads = _invoke(monkeypatch, "services.reward.load_bench", "run_load_bench", argv)
    assert out.exit_code == 0, out.output
    assert seen + loads == [RewardBenchOptions(queries=1, models=Path("m"), threads=0),
                            RewardBenchOptions(load=True, clients=2, url="http://r", api_key="k")]  # fmt: skip
    out, loads = _invoke(
        monkeypatch, "services.reward.load_bench", "run_load_bench", ["bench", "reward", "--load", "--responses", "1"]
    )
    assert out.exit_code == 2 and not loads, out.output


def test_serve_reward_maps_its_options_to_settings(monkeypatch):
    from shared.cli import app

    seen: list = []
    monkeypatch.setattr("services.reward.cli._run_worker_only", seen.append)
    out = CliRunner().invoke(app, ["serve", "reward", "--worker-only", "--no-worker", "--port", "8111", "--host", "0.0.0.0"])
    assert out.exit_code == 0, out.output
    assert (seen[0].host, seen[0].port, seen[0].worker) == ("0.0.0.0", 8111, False)


def test_bench_rollout_builds_its_config(monkeypatch):
    from services.rollout.bench import BenchConfig

    argv = ["bench", "rollout", "--presets", "tiny, ", "--repeats", "1", "--out-dir", "o"]
    out, seen = _invoke(monkeypatch, "services.rollout.bench", "run_bench", argv)
    assert out.exit_code == 0, out.output
    assert seen == [BenchConfig(presets=("tiny",), repeats=1, out_dir=Path("o"))]
