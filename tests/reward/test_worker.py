"""The reward worker on a real Redis: groups in, weighted samples and the marker out, exactly once."""

import json
import sys
import threading
import time
from collections import Counter

import pytest

from services.orchestrator.loop import iteration_record
from services.reward.state import IterationState
from services.reward.worker import RewardWorker, samples_health, weighted_samples
from shared.local_redis import free_port
from shared.process import ServiceProcess
from shared.runs import samples_file, write_samples_file
from shared.schemas import STREAM_ROLLOUTS, STREAM_SAMPLES, IterationComplete, RolloutGroup, WeightedSample, decode_message
from shared.streams import publish
from tests.fixtures.reward import ROOT, model_env, model_settings
from tests.reward.test_scorer import DOC_OTHER, DOC_SHORT, structured


def make_groups(run: str, iteration: int, k: int) -> list[RolloutGroup]:
    groups = []
    for g in range(k):
        responses = [structured(f"summary {g} {i}", (DOC_SHORT + " ") * (i + 1) + DOC_OTHER * (g % 2)) for i in range(3)] + (
            ["no tags at all"] if g % 2 == 0 else []
        )
        finish = ["stop", "length", "stop", "length"][: len(responses)]
        groups.append(
            RolloutGroup(
                run_id=run,
                iteration=iteration,
                group_id=f"{run}:{iteration}:{g}",
                group_index=g,
                query=f"Write report {g} on SOE reform",
                responses=responses,
                finish_reasons=finish,
                adapter_version=f"iter-{iteration:04d}",
                query_source="generated",
            )
        )
    return groups


def published(client) -> tuple[list[WeightedSample], list[IterationComplete]]:
    payloads = [decode_message(fields) for _, fields in client.xrange(STREAM_SAMPLES)]
    return (
        [p for p in payloads if isinstance(p, WeightedSample)],
        [p for p in payloads if isinstance(p, IterationComplete)],
    )


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what}")


def check_iteration(client, groups: list[RolloutGroup], run: str, iteration: int) -> list[WeightedSample]:
    samples, markers = published(client)
    samples = [s for s in samples if s.run_id == run and s.iteration == iteration]
    markers = [m for m in markers if m.run_id == run and m.iteration == iteration]
    expected_ids = {f"{g.group_id}:{i}" for g in groups for i in range(len(g.responses))}
    counts = Counter(s.sample_id for s in samples)
    assert set(counts) == expected_ids and set(counts.values()) == {1}  # every response once
    assert len(markers) == 1 and markers[0].stage == "reward" and markers[0].count == len(expected_ids)
    by_id = {f"{g.group_id}:{i}": (g, text) for g in groups for i, text in enumerate(g.responses)}
    for s in samples:
        group, text = by_id[s.sample_id]
        assert s.query == group.query and s.response == text and s.group_id == group.group_id
        # what sampled it and how it ended travel with the sample (the run's samples file shows them)
        assert s.finish_reason == group.finish_reasons[s.response_index] and s.adapter_version == group.adapter_version
        assert s.query_source == "generated" and (s.metrics is not None) == s.parsed
        if not s.parsed:
            assert s.weight == -1.0 and s.label == "undesirable" and s.z is None
        else:
            assert s.label == ("desirable" if s.z >= 0 else "undesirable")
    pos = [s.weight for s in samples if s.parsed and s.z >= 0]
    neg = [s.weight for s in samples if s.parsed and s.z < 0]
    assert sum(pos) == pytest.approx(len(pos)) and sum(neg) == pytest.approx(-len(neg))  # eq. 8-9 over the iteration
    return samples


def run_workers(workers: list[RewardWorker], until, timeout: float = 120.0):
    stop = threading.Event()
    threads = [threading.Thread(target=w.run, args=(stop,), daemon=True) for w in workers]
    for t in threads:
        t.start()
    try:
        wait_for(until, timeout, "the iteration to finalize")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)


def test_an_iteration_in_weighted_samples_and_marker_out(redis_client, reward_scorer, tiny_models, tmp_path):
    groups = make_groups("r1", 0, 3)
    for g in groups:
        publish(redis_client, STREAM_ROLLOUTS, g)
    publish(redis_client, STREAM_ROLLOUTS, IterationComplete(run_id="r1", iteration=0, stage="rollout", count=3))
    settings = model_settings(tiny_models, consumer_name="w1", block_ms=100)
    worker = RewardWorker(redis_client, reward_scorer.score, settings)
    run_workers([worker], lambda: published(redis_client)[1])
    samples = check_iteration(redis_client, groups, "r1", 0)
    assert len(samples) == 3 * 3 + 2
    # the weights are those of eq. 5-9 over the iteration's stored metrics
    state = IterationState(redis_client, "r1", 0)
    assert [s.weight for s in weighted_samples(state.load_all())] == [s.weight for s in samples]
    assert redis_client.xpending(STREAM_ROLLOUTS, "reward")["pending"] == 0  # all acked
    # group health of the finalized iteration in /metrics, the same figures as the run's iteration record
    gauge = worker.telemetry.registry.get_sample_value
    assert gauge("grace_reward_health_iteration") == 0 and gauge("grace_reward_health_groups", {"source": "iteration"}) == 3
    assert gauge("grace_reward_parse_rate", {"source": "iteration"}) == pytest.approx(9 / 11)
    assert gauge("grace_reward_truncation_rate", {"source": "iteration"}) == pytest.approx(5 / 11)  # 2 + 1 + 2 'length'
    lengths = [s.metrics.length for s in samples if s.parsed]
    assert gauge("grace_reward_metric_mean", {"source": "iteration", "metric": "L"}) == pytest.approx(sum(lengths) / 9)
    record = iteration_record(write_samples_file(samples_file(tmp_path, "r1", 0), samples))
    for key, value in samples_health(samples).flat().items():
        assert record[key] == pytest.approx(value), key
    assert record["zero_variance_share"] == gauge("grace_reward_zero_variance_share", {"source": "iteration"})
    assert record["L_std"] == pytest.approx(gauge("grace_reward_metric_std", {"source": "iteration", "metric": "L"}))


def test_two_workers_share_groups_and_normalize_once(redis_client, reward_scorer, tiny_models):
    groups = make_groups("r2", 4, 6)
    for g in groups[:3]:
        publish(redis_client, STREAM_ROLLOUTS, g)
    publish(redis_client, STREAM_ROLLOUTS, IterationComplete(run_id="r2", iteration=4, stage="rollout", count=6))
    for g in groups[3:]:  # groups may arrive after the rollout marker
        publish(redis_client, STREAM_ROLLOUTS, g)
    workers = [
        RewardWorker(
            redis_client, reward_scorer.score, model_settings(tiny_models, consumer_name=name, worker_batch=1, block_ms=50)
        )
        for name in ("a", "b")
    ]
    run_workers(workers, lambda: published(redis_client)[1])
    time.sleep(0.5)  # a second finalization, if there were one, would show up now
    check_iteration(redis_client, groups, "r2", 4)
    assert (
        sum(w.telemetry.registry.get_sample_value("grace_reward_worker_groups_total") for w in workers) == 6
    )  # each group scored once
    assert sum(w.telemetry.registry.get_sample_value("grace_reward_worker_iterations_total") for w in workers) == 1


def test_a_poison_group_is_dead_lettered_and_the_iteration_finalizes_without_it(redis_client, reward_scorer, tiny_models):
    groups = make_groups("r5", 0, 3)
    poison = groups[1].model_copy(update={"query": "poison: the scorer raises on this group"})
    groups[1] = poison
    for g in groups:
        publish(redis_client, STREAM_ROLLOUTS, g)
    publish(redis_client, STREAM_ROLLOUTS, IterationComplete(run_id="r5", iteration=0, stage="rollout", count=3))

    def score(items):
        if any(query.startswith("poison") for query, _ in items):
            raise RuntimeError("scorer failure on one group")
        return reward_scorer.score(items)

    settings = model_settings(tiny_models, consumer_name="w5", block_ms=50, min_idle_ms=100, max_deliveries=2)
    worker = RewardWorker(redis_client, score, settings)
    run_workers([worker], lambda: published(redis_client)[1])
    good = [groups[0], groups[2]]
    samples = check_iteration(redis_client, good, "r5", 0)  # batch-mates of the poison group are not lost
    assert {s.group_id for s in samples} == {g.group_id for g in good}
    dead = [decode_message(f) for _, f in redis_client.xrange(STREAM_ROLLOUTS + ":dead")]
    assert [d.group_id for d in dead] == [poison.group_id]
    assert list(IterationState(redis_client, "r5", 0).dropped()) == [poison.group_id]
    assert redis_client.xpending(STREAM_ROLLOUTS, "reward")["pending"] == 0


def test_a_group_failing_validation_is_dropped_from_the_iteration_it_names(redis_client, reward_scorer, tiny_models):
    groups = make_groups("r6", 0, 2)
    publish(redis_client, STREAM_ROLLOUTS, groups[0])
    invalid = json.loads(groups[1].model_dump_json()) | {"responses": "one string, not a list"}
    redis_client.xadd(STREAM_ROLLOUTS, {"type": RolloutGroup.kind, "data": json.dumps(invalid)})
    publish(redis_client, STREAM_ROLLOUTS, IterationComplete(run_id="r6", iteration=0, stage="rollout", count=2))
    worker = RewardWorker(redis_client, reward_scorer.score, model_settings(tiny_models, consumer_name="w6", block_ms=50))
    run_workers([worker], lambda: published(redis_client)[1])
    check_iteration(redis_client, groups[:1], "r6", 0)
    dropped = IterationState(redis_client, "r6", 0).dropped()
    assert list(dropped) == [groups[1].group_id] and "responses" in dropped[groups[1].group_id]
    assert redis_client.xpending(STREAM_ROLLOUTS, "reward")["pending"] == 0


def test_finalization_resumed_after_a_crash_publishes_the_rest_once(redis_client, reward_scorer, tiny_models):
    groups = make_groups("r3", 1, 3)
    settings = model_settings(tiny_models, consumer_name="w3", block_ms=50)
    worker = RewardWorker(redis_client, reward_scorer.score, settings)
    state = IterationState(redis_client, "r3", 1)
    state.set_expected(3)
    worker._score_new(groups, {("r3", 1): state})
    # a finalizer that died after publishing 4 samples, before the rest and the marker
    samples = weighted_samples(state.load_all())
    assert state.publish_once(STREAM_SAMPLES, [(s.sample_id, s) for s in samples[:4]]) == 4
    assert state.publish_once(STREAM_SAMPLES, [(s.sample_id, s) for s in samples[:4]]) == 0  # retry: nothing new
    assert worker.finalize(state) is True
    assert worker.finalize(state) is True  # idempotent
    check_iteration(redis_client, groups, "r3", 1)


def test_worker_killed_mid_iteration_and_restarted_publishes_each_sample_once(redis_client, redis_url, tiny_models, tmp_path):
    groups = make_groups("r4", 2, 6)
    for g in groups[:5]:
        publish(redis_client, STREAM_ROLLOUTS, g)
    env = {
        **model_env(tiny_models),
        "REDIS_URL": redis_url,
        "GRACE_REWARD_WORKER_BATCH": "1",
        "GRACE_REWARD_MIN_IDLE_MS": "500",
        "GRACE_REWARD_BLOCK_MS": "100",
        "GRACE_REWARD_DTYPE": "fp32",
    }
    serve = [sys.executable, "-m", "shared.cli", "serve", "reward"]

    def worker(name: str, args: list[str]) -> ServiceProcess:
        env_named = {**env, "GRACE_REWARD_CONSUMER_NAME": name}
        process = ServiceProcess(name, serve + args, tmp_path / f"{name}.log", env=env_named, cwd=ROOT)
        process.start()
        return process

    state = IterationState(redis_client, "r4", 2)
    # first: the worker thread inside the HTTP service (the default); then: a worker-only process
    first = worker("doomed", ["--host", "127.0.0.1", "--port", str(free_port())])
    try:
        wait_for(lambda: state.ledger.arrived() >= 2, 180, "the first worker to score some groups")
    finally:
        first.kill()
    assert state.ledger.arrived() < 6 and not published(redis_client)[1]  # killed mid-iteration
    publish(redis_client, STREAM_ROLLOUTS, groups[5])
    publish(redis_client, STREAM_ROLLOUTS, IterationComplete(run_id="r4", iteration=2, stage="rollout", count=6))
    second = worker("survivor", ["--worker-only"])  # another name: it must reclaim what the dead one left pending
    try:
        wait_for(lambda: published(redis_client)[1], 180, "the restarted worker to finalize")
        wait_for(lambda: redis_client.xpending(STREAM_ROLLOUTS, "reward")["pending"] == 0, 30, "all entries acked")
    finally:
        second.stop()
    check_iteration(redis_client, groups, "r4", 2)


def test_two_worker_processes_score_each_group_once_and_match_one_worker(
    redis_client, redis_url, reward_scorer, tiny_models, tmp_path
):
    """Two `grace serve reward --worker-only` processes in one consumer group: every group scored once in all,
    the iteration finalized once, and the weighted samples those of a single worker on the same groups."""
    import re

    groups = make_groups("r7", 0, 6)
    env = {**model_env(tiny_models), "REDIS_URL": redis_url, "GRACE_REWARD_WORKER_BATCH": "1",
           "GRACE_REWARD_BLOCK_MS": "100", "GRACE_REWARD_DTYPE": "fp32"}  # fmt: skip
    processes = [
        ServiceProcess(
            name,
            [sys.executable, "-m", "shared.cli", "serve", "reward", "--worker-only"],
            tmp_path / f"{name}.log",
            env={**env, "GRACE_REWARD_CONSUMER_NAME": name},
            cwd=ROOT,
        ).start()
        for name in ("worker-a", "worker-b")
    ]
    try:
        for g in groups:
            publish(redis_client, STREAM_ROLLOUTS, g)
        publish(redis_client, STREAM_ROLLOUTS, IterationComplete(run_id="r7", iteration=0, stage="rollout", count=6))
        wait_for(lambda: published(redis_client)[1], 300, "the two processes to finalize")
        time.sleep(1.0)  # a second finalization, if there were one, would show up now
    finally:
        for process in processes:
            process.stop()
    together = check_iteration(redis_client, groups, "r7", 0)
    logs = [p.log_path.read_text() for p in processes]
    scored = [sum(int(n) for n in re.findall(r"event=groups_scored groups=(\d+)", log)) for log in logs]
    assert sum(scored) == 6, scored  # each group scored once, by one of the two
    assert sum(log.count("event=iteration_finalized") for log in logs) == 1

    single = [g.model_copy(update={"run_id": "r7-one", "group_id": g.group_id.replace("r7:", "r7-one:")}) for g in groups]
    for g in single:
        publish(redis_client, STREAM_ROLLOUTS, g)
    publish(redis_client, STREAM_ROLLOUTS, IterationComplete(run_id="r7-one", iteration=0, stage="rollout", count=6))
    worker = RewardWorker(redis_client, reward_scorer.score, model_settings(tiny_models, consumer_name="alone", block_ms=50))
    run_workers([worker], lambda: [m for m in published(redis_client)[1] if m.run_id == "r7-one"])
    alone = {s.sample_id.replace("r7-one:", "r7:"): s for s in check_iteration(redis_client, single, "r7-one", 0)}
    for s in together:
        assert (s.label, s.parsed) == (alone[s.sample_id].label, alone[s.sample_id].parsed)
        assert s.weight == pytest.approx(alone[s.sample_id].weight, rel=1e-6, abs=1e-9), s.sample_id
