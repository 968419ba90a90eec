"""Two semi-online iterations, then an offline run, end to end on the tiny stack, every component
real: a private Redis, vLLM's CPU server behind the gateway, the reward service and worker, the
trainer worker, the judge, each a separate process over HTTP/Redis."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis

from services.orchestrator.loop import RunOptions, SemiOnlineRun
from shared.jsonl import read_queries
from shared.parsing import normalize_query
from shared.runs import RunConfig, read_samples_file, samples_file
from shared.schemas import STREAM_ROLLOUTS, STREAM_SAMPLES, RolloutGroup, WeightedSample, decode_message
from shared.tracking import TrackingOptions

RUN_ID = "e2e"
OFFLINE_ID = "e2e-offline"


@pytest.fixture(scope="module")
def finished_run(tiny_stack):
    work, info = tiny_stack
    config = RunConfig(run_id=RUN_ID, iterations=2, queries_per_iteration=2, responses_per_query=3)
    tracking = TrackingOptions(report_to=("tensorboard",))  # --report-to tensorboard
    run = SemiOnlineRun(
        RunOptions(config=config, run_dir=work / "runs" / RUN_ID, eval_limit=2, eval_max_tokens=64, tracking=tracking), info
    )
    report = run.run()
    offline = RunConfig.from_budget(OFFLINE_ID, total_queries=3, k=2, iterations=5, offline=True,
                                    responses_per_query=3, epochs=2)  # fmt: skip
    SemiOnlineRun(RunOptions(config=offline, run_dir=work / "runs" / OFFLINE_ID, eval_limit=2, eval_max_tokens=64), info).run()
    client = redis.Redis.from_url(info.redis_url)
    streams = {name: [decode_message(f) for _, f in client.xrange(name)] for name in (STREAM_ROLLOUTS, STREAM_SAMPLES)}
    yield {"work": work, "report": report, "streams": streams, "run": run, "info": info, "redis": client}


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
        state = json.loads(
            (finished_run["work"] / "adapters" / RUN_ID / f"iter-{iteration:04d}" / "trainer_state.json").read_text()
        )
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


def test_report_to_tensorboard_recorded_trainer_steps_iterations_and_evaluations(finished_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = finished_run["work"] / "runs" / RUN_ID
    events = EventAccumulator(str(run_dir / "tracking" / "tensorboard"))
    events.Reload()
    steps = [json.loads(line) for line in (run_dir / "train_metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [(e.step, round(e.value, 4)) for e in events.Scalars("train/loss")] == [
        (i, round(r["loss"], 4)) for i, r in enumerate(steps, 1)
    ]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    iterations = [r for r in records if r["stage"] == "iteration"]
    assert [(e.step, e.value) for e in events.Scalars("iteration/trained_samples")] == [(1, 6.0), (2, 6.0)]
    assert [round(e.value, 4) for e in events.Scalars("iteration/parse_rate")] == [round(r["parse_rate"], 4) for r in iterations]
    assert [e.step for e in events.Scalars("eval/parse_rate")] == [0, 1, 2]  # base, iter 1, iter 2
    assert {"eval_responses/base/text_summary", "eval_responses/iter-2/text_summary"} <= set(events.Tags()["tensors"])


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


def _trainer_state(finished_run, run_id: str, iteration: int) -> dict:
    path = finished_run["work"] / "adapters" / run_id / f"iter-{iteration:04d}" / "trainer_state.json"
    return json.loads(path.read_text())


def test_samples_file_matches_what_the_trainer_trained(finished_run):
    run_dir = finished_run["work"] / "runs" / RUN_ID
    for iteration in (0, 1):
        rows = read_samples_file(samples_file(finished_run["work"] / "runs", RUN_ID, iteration))
        assert sorted(r["sample_id"] for r in rows) == sorted(_trainer_state(finished_run, RUN_ID, iteration)["sample_ids"])
        for row in rows:
            assert row["query"].strip() and row["source"] in ("generated", "seed_fallback")
            assert row["finish_reason"] in ("stop", "length") and row["adapter_version"] == ("base", "iter-0000")[iteration]
            assert (row["metrics"] is not None) == row["parsed"] and isinstance(row["weight"], float)
            assert row["z"] is None or row["rank_sum"] is not None
    report = (run_dir / "report.md").read_text()
    assert "Truncation rate" in report and "What each iteration trained on" in report
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    iterations = [r for r in records if r["stage"] == "iteration"]
    assert [r["trained_samples"] for r in iterations] == [6, 6]
    assert all(0 <= r["truncation_rate"] <= 1 and r["degenerate_groups"] <= r["groups"] == 2 for r in iterations)


def test_offline_run_samples_once_from_the_start_on_generated_queries_never_heldout(finished_run):
    groups = [p for p in finished_run["streams"][STREAM_ROLLOUTS] if isinstance(p, RolloutGroup) and p.run_id == OFFLINE_ID]
    assert len(groups) == 3 and {g.iteration for g in groups} == {0}  # one round of all N = 3 queries
    assert {g.adapter_version for g in groups} == {"base"}  # the starting policy, not the e2e run's last adapter
    assert {g.query_source for g in groups} <= {"offline", "seed_fallback"}
    heldout = {normalize_query(row["query"]) for row in read_queries(Path("data/test_queries.jsonl"))}
    assert not {normalize_query(g.query) for g in groups} & heldout
    state = _trainer_state(finished_run, OFFLINE_ID, 0)
    assert state["start"] is None and len(state["sample_ids"]) == 9
    rows = read_samples_file(samples_file(finished_run["work"] / "runs", OFFLINE_ID, 0))
    assert sorted(r["sample_id"] for r in rows) == sorted(state["sample_ids"])
    assert not (finished_run["work"] / "adapters" / OFFLINE_ID / "iter-0001").exists()
    metrics = (finished_run["work"] / "runs" / OFFLINE_ID / "train_metrics.jsonl").read_text().splitlines()
    assert len([line for line in metrics if line.strip()]) == 2 * 3  # --epochs 2 of ceil(9 / batch 4) steps


def test_both_rollout_replicas_sampled_and_serve_the_last_adapter(finished_run):
    """``rollout_replicas=2``: the groups of an iteration go to both gateways round-robin, and the loop
    waited until every live replica (both heartbeats) had loaded each new adapter."""
    import httpx

    from shared.heartbeats import live_replicas

    info = finished_run["info"]
    assert len(info.rollout_urls) == 2 and info.urls["rollout"] == info.rollout_urls[0]
    assert len(live_replicas(finished_run["redis"])) == 2
    for url in info.rollout_urls:
        snapshot = httpx.get(url + "/admin/adapters", timeout=10).json()  # the session stack sets no API key
        # iteration 1 samples `policy` = iter-0000: K=2 groups, one per replica
        assert snapshot["requests"].get("iter-0000", 0) >= 1, (url, snapshot["requests"])
        versions = [h["version"] for h in snapshot["history"]]
        assert "iter-0001" in versions, (url, versions)
