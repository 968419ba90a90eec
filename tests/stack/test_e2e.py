"""Two semi-online iterations end to end on the tiny stack, every component real:
a private Redis, vLLM's CPU server behind the gateway, the reward service and
worker, the trainer worker, the judge, each a separate process over HTTP/Redis."""

from __future__ import annotations

import json

import pytest
import redis

from services.stack.loop import RunOptions, SemiOnlineRun
from services.stack.stack import LocalStack, StackConfig
from shared.runs import RunConfig
from shared.schemas import STREAM_ROLLOUTS, STREAM_SAMPLES, RolloutGroup, WeightedSample, decode_message

RUN_ID = "e2e"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_models):
    work = tmp_path_factory.mktemp("e2e")
    stack = LocalStack(
        StackConfig(
            stack_dir=work / "stack",
            common={
                "policy_model": str(tiny_models.policy),
                "general_model": str(tiny_models.general),
                "domain_model": str(tiny_models.domain),
                "embedding_model": str(tiny_models.embedding),
                "adapter_root": str(work / "adapters"),
                "run_root": str(work / "runs"),
            },
            per_service={
                "rollout": {"max_tokens": 96, "generation_max_tokens": 96, "generation_attempts": 2},
                "trainer": {"lora_rank": 8, "lora_alpha": 16, "batch_size": 4},
            },
        )
    )
    info = stack.up()
    try:
        config = RunConfig(run_id=RUN_ID, iterations=2, queries_per_iteration=2, responses_per_query=3)
        run = SemiOnlineRun(
            RunOptions(config=config, run_dir=work / "runs" / RUN_ID, eval_limit=2, eval_max_tokens=64), info
        )
        report = run.run()
        client = redis.Redis.from_url(info.redis_url)
        streams = {name: [decode_message(f) for _, f in client.xrange(name)] for name in (STREAM_ROLLOUTS, STREAM_SAMPLES)}
        yield {"work": work, "report": report, "streams": streams, "run": run, "info": info, "redis": client}
    finally:
        stack.down()


def test_second_iteration_samples_from_first_adapter(finished_run):
    groups = [p for p in finished_run["streams"][STREAM_ROLLOUTS] if isinstance(p, RolloutGroup) and p.run_id == RUN_ID]
    versions = {it: {g.adapter_version for g in groups if g.iteration == it} for it in (0, 1)}
    assert versions[0] == {"base"}
    assert versions[1] == {"iter-0000"}
    assert all(len(g.responses) == 3 for g in groups) and len(groups) == 4


def test_every_published_sample_trained_exactly_once(finished_run):
    samples = [p for p in finished_run["streams"][STREAM_SAMPLES] if isinstance(p, WeightedSample) and p.run_id == RUN_ID]
    for iteration in (0, 1):
        published = [s.sample_id for s in samples if s.iteration == iteration]
        assert len(published) == len(set(published)) == 6  # 2 queries x 3 responses, no duplicate
        state = json.loads((finished_run["work"] / "adapters" / RUN_ID / f"iter-{iteration:04d}" / "trainer_state.json").read_text())
        assert sorted(state["sample_ids"]) == sorted(published)
    assert state["start"] == "iter-0000"  # iteration 1 continued from iteration 0's adapter


def test_report_and_metrics_written(finished_run):
    run_dir = finished_run["work"] / "runs" / RUN_ID
    report = finished_run["report"].read_text()
    assert finished_run["report"] == run_dir / "report.md"
    for label in ("base", "iter 1", "iter 2"):
        assert f"| {label} |" in report
    assert (run_dir / "progress_zscores.png").stat().st_size > 1000
    assert (run_dir / "training_curves.png").stat().st_size > 1000
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["label"] for r in rows if r["stage"] == "eval"] == ["base", "iter 1", "iter 2"]
    assert sum(1 for line in (run_dir / "train_metrics.jsonl").read_text().splitlines() if line.strip()) >= 2


def test_starting_the_same_run_again_continues_without_new_work(finished_run):
    client = finished_run["redis"]
    lengths = {name: client.xlen(name) for name in (STREAM_ROLLOUTS, STREAM_SAMPLES)}
    again = SemiOnlineRun(finished_run["run"].options, finished_run["info"])
    assert again.state.trained == [0, 1]
    again.run()
    assert {name: client.xlen(name) for name in lengths} == lengths


def test_the_run_leaves_the_process_environment_alone(finished_run):
    import os

    # later tests and services must not inherit the stack's settings file
    assert os.environ.get("GRACE_CONFIG") != finished_run["info"].config_path
