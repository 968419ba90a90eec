"""The trainer worker on real Redis: one epoch per iteration, adapters published once, crash-safe.

Tests share the session Redis with other suites, so they never flush it: each
uses its own run id and looks only at its own keys and events.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis

from services.trainer.state import TrainerState
from services.trainer.worker import TrainerWorker
from shared.adapters import AdapterStore, adapter_checksum, adapter_version
from shared.process import ServiceProcess
from shared.runs import RunConfig, read_samples_file, samples_file, save_run_config
from shared.schemas import STREAM_ADAPTERS, STREAM_SAMPLES, AdapterEvent, IterationComplete, WeightedSample, decode_message
from shared.streams import publish
from tests.fixtures.trainer import trainer_env

WORDS = "reform governance capital strategy supervision enterprise market budget report policy".split()


def _samples(run_id: str, iteration: int, groups: int, per_group: int = 4) -> list[WeightedSample]:
    out = []
    for g in range(groups):
        for i in range(per_group):
            weight = [1.2, 0.4, -0.3, -1.0][i % 4]
            text = " ".join(WORDS[(g + i + k) % len(WORDS)] for k in range(8 + 3 * i))
            out.append(WeightedSample(
                run_id=run_id, iteration=iteration, sample_id=f"{run_id}:{iteration}:{g}:{i}", group_id=f"{run_id}:{iteration}:{g}",
                response_index=i, query=f"Write a report about {WORDS[g]}", weight=weight, parsed=True,
                response=f"<summary>{text}</summary><outline>1. x</outline><answer>{text}</answer>",
                label="desirable" if weight >= 0 else "undesirable",
            ))  # fmt: skip
    return out


def _adapter_events(client: redis.Redis, run_id: str) -> list[AdapterEvent]:
    events = [decode_message(fields) for _, fields in client.xrange(STREAM_ADAPTERS)]
    return [e for e in events if isinstance(e, AdapterEvent) and e.run_id == run_id]


def _wait(predicate, timeout: float, what: str, process: ServiceProcess | None = None, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process is not None and not process.alive():
            raise AssertionError(f"trainer exited while waiting for {what}:\n{process.log_tail()}")
        if time.monotonic() > deadline:
            tail = process.log_tail() if process else ""
            raise AssertionError(f"timed out waiting for {what}\n{tail}")
        time.sleep(interval)


def _run_until_done(worker: TrainerWorker, run_id: str, iteration: int, timeout: float = 600) -> None:
    _wait(lambda: worker.run_once(block_ms=100) >= 0 and iteration in worker.state.done(run_id), timeout, f"{run_id}/{iteration}")


def test_worker_trains_publishes_once_chains_and_never_retrains(redis_url, trainer_settings):
    client = redis.Redis.from_url(redis_url)
    run_id = f"w-{uuid.uuid4().hex[:8]}"
    settings = trainer_settings.model_copy(update={"batch_size": 4, "block_ms": 100, "consumer": f"c-{run_id}"})
    store = AdapterStore(settings.adapter_root)

    samples = _samples(run_id, 0, groups=2)
    for sample in samples + samples[:2]:  # redelivered duplicates collapse by sample id
        publish(client, STREAM_SAMPLES, sample)
    publish(client, STREAM_SAMPLES, IterationComplete(run_id=run_id, iteration=0, stage="reward", count=len(samples)))
    worker = TrainerWorker(settings, client)
    _run_until_done(worker, run_id, 0)

    path = store.path(run_id, "iter-0000")
    state = json.loads((path / "trainer_state.json").read_text())
    assert state["sample_ids"] == sorted(s.sample_id for s in samples) and state["start"] is None
    (event,) = _adapter_events(client, run_id)
    assert event.version == "iter-0000" and event.checksum == adapter_checksum(path) and event.rank == 8
    assert event.loss == "grace_kto" and Path(event.path) == path
    from peft import PeftModel

    from services.trainer.model import load_base, resolve_runtime

    loaded = PeftModel.from_pretrained(load_base(settings.policy_model, resolve_runtime(settings)), path)
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in loaded.named_parameters()), "trained, non-zero LoRA B"
    rows = [json.loads(line) for line in (settings.run_root / run_id / "train_metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and {"loss", "z_ref", "lr", "reward_margin", "weight_abs_mean"} <= set(rows[0])
    assert TrainerState(client).done(run_id)[0]["samples"] == len(samples)

    # the next iteration continues from the previous adapter
    publish_all = _samples(run_id, 1, groups=1)
    for sample in publish_all:
        publish(client, STREAM_SAMPLES, sample)
    publish(client, STREAM_SAMPLES, IterationComplete(run_id=run_id, iteration=1, stage="reward", count=len(publish_all)))
    _run_until_done(worker, run_id, 1)
    path1 = store.path(run_id, "iter-0001")
    assert json.loads((path1 / "trainer_state.json").read_text())["start"] == "iter-0000"

    # a crash after the adapter was written but before the event and the done record: no retraining
    written = (path1 / "adapter_model.safetensors").stat().st_mtime_ns
    client.hdel(f"grace:trainer:{run_id}:done", "1")
    client.srem(f"grace:trainer:{run_id}:published", "iter-0001")
    restarted = TrainerWorker(settings, client)
    _run_until_done(restarted, run_id, 1)
    assert (path1 / "adapter_model.safetensors").stat().st_mtime_ns == written
    assert restarted._policy is None, "an existing adapter version must not load the model or retrain"
    versions = [e.version for e in _adapter_events(client, run_id)]
    assert versions == ["iter-0000", "iter-0001", "iter-0001"]  # republished once, for the lost event
    restarted.run_once(block_ms=50)
    assert len(_adapter_events(client, run_id)) == 3  # a finished iteration publishes nothing more
    client.close()


def _train_two_iterations(client: redis.Redis, settings, run_config) -> list[dict]:
    """Publishes and trains iterations 0 and 1 of ``run_config`` (2 groups of 4); returns the step rows."""
    from shared.runs import save_run_config

    save_run_config(client, run_config)
    worker = TrainerWorker(settings, client)
    for iteration in (0, 1):
        samples = _samples(run_config.run_id, iteration, groups=2)
        for sample in samples:
            publish(client, STREAM_SAMPLES, sample)
        publish(client, STREAM_SAMPLES, IterationComplete(run_id=run_config.run_id, iteration=iteration, stage="reward",
                                                          count=len(samples)))  # fmt: skip
        _run_until_done(worker, run_config.run_id, iteration)
    lines = (settings.run_root / run_config.run_id / "train_metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_lr_schedule_run_continues_the_cosine_and_carries_adamw_per_iteration_restarts(redis_url, trainer_settings):
    import torch

    from services.trainer.batching import cosine_lr
    from shared.runs import RunConfig

    client = redis.Redis.from_url(redis_url)
    s = trainer_settings
    store = AdapterStore(s.adapter_root)
    lr = lambda step, total: cosine_lr(step, total, s.learning_rate, s.min_learning_rate, s.warmup_ratio)  # noqa: E731

    # run: 2 rounds x K=2 queries x m=4 responses, batch 2 -> 4 steps a round, one cosine of 8 steps
    run_id = f"lr-{uuid.uuid4().hex[:8]}"
    settings = s.model_copy(update={"batch_size": 2, "block_ms": 100, "consumer": f"c-{run_id}", "lr_schedule": "run"})
    config = RunConfig(run_id=run_id, iterations=2, queries_per_iteration=2, responses_per_query=4)
    rows = _train_two_iterations(client, settings, config)
    assert [(r["iteration"], r["step"]) for r in rows] == [(0, k) for k in range(1, 5)] + [(1, k) for k in range(1, 5)]
    assert [r["lr"] for r in rows] == pytest.approx([lr(k, 8) for k in range(8)], abs=1e-6)  # rows round to 6 decimals
    assert rows[4]["lr"] < rows[3]["lr"] < s.learning_rate  # round 2 starts down the curve, no new warm-up
    for version, done in (("iter-0000", 4), ("iter-0001", 8)):
        saved = torch.load(store.path(run_id, version) / "optimizer.pt", weights_only=True)
        assert saved["steps_done"] == done
        assert {float(p["step"]) for p in saved["state"]["state"].values()} == {float(done)}, "AdamW state carried over"

    # per_iteration (default), with RunConfig.epochs = 2: each round restarts its own 8-step cosine, fresh AdamW
    run_id = f"lp-{uuid.uuid4().hex[:8]}"
    settings = s.model_copy(update={"batch_size": 2, "block_ms": 100, "consumer": f"c-{run_id}"})
    assert settings.lr_schedule == "per_iteration"
    rows = _train_two_iterations(client, settings, config.model_copy(update={"run_id": run_id, "epochs": 2}))
    assert len(rows) == 16
    assert [r["lr"] for r in rows] == pytest.approx([lr(k, 8) for k in range(8)] * 2, abs=1e-6)
    assert not (store.path(run_id, "iter-0000") / "optimizer.pt").exists()
    client.close()


def test_dead_lettered_samples_are_dropped_and_the_iteration_trains_without_them(redis_client, trainer_settings):
    client = redis_client
    run_id = f"d-{uuid.uuid4().hex[:8]}"
    settings = trainer_settings.model_copy(update={"batch_size": 4, "block_ms": 100, "consumer": f"c-{run_id}"})
    samples = _samples(run_id, 0, groups=1)
    good, broken = samples[:3], samples[3]
    for sample in good:
        publish(client, STREAM_SAMPLES, sample)
    bad_json = json.loads(broken.model_dump_json()) | {"weight": "heavy"}  # fails validation, still names itself
    bad_id = client.xadd(STREAM_SAMPLES, {"type": WeightedSample.kind, "data": json.dumps(bad_json)}).decode()
    lost_id = client.xadd(STREAM_SAMPLES, {"type": WeightedSample.kind, "data": "{truncated"}).decode()  # names nothing
    publish(client, STREAM_SAMPLES, IterationComplete(run_id=run_id, iteration=0, stage="reward", count=len(samples)))
    worker = TrainerWorker(settings, client)
    _run_until_done(worker, run_id, 0, timeout=300)

    assert list(worker.state.dropped(run_id, 0)) == [broken.sample_id]
    assert "heavy" in worker.state.dropped(run_id, 0)[broken.sample_id]  # the validation error is the reason
    record = worker.state.done(run_id)[0]
    assert record["samples"] == 3 and record["dropped"] == 1
    path = AdapterStore(settings.adapter_root).path(run_id, "iter-0000")
    assert json.loads((path / "trainer_state.json").read_text())["sample_ids"] == sorted(s.sample_id for s in good)
    dead = {fields[b"dead.id"].decode() for _, fields in client.xrange(f"{STREAM_SAMPLES}:dead")}
    assert {bad_id, lost_id} <= dead
    assert not client.xpending_range(STREAM_SAMPLES, settings.group, min=bad_id, max=bad_id, count=1)
    client.xdel(STREAM_SAMPLES, bad_id, lost_id)  # later suites on this Redis decode every entry


def test_kill_9_mid_iteration_then_restart_trains_exactly_the_published_samples(redis_url, tiny_models, tmp_path):
    client = redis.Redis.from_url(redis_url)
    run_id = f"k-{uuid.uuid4().hex[:8]}"
    adapters, runs = tmp_path / "adapters", tmp_path / "runs"
    env = trainer_env(redis_url, tiny_models.policy, adapters, runs, GRACE_TRAINER_BATCH_SIZE="2")
    command = [sys.executable, "-m", "shared.cli", "serve", "trainer"]
    state = TrainerState(client)
    samples = _samples(run_id, 0, groups=8)  # 16 steps of 2: an idle machine must not finish the epoch before the kill
    half = len(samples) // 2

    def start(name: str) -> ServiceProcess:
        return ServiceProcess(name, command, tmp_path / f"{name}.log", env=env).start()

    # 1. killed after storing half the samples (the reward stage is still publishing)
    trainer = start("trainer-1")
    for sample in samples[:half] + samples[:1]:
        publish(client, STREAM_SAMPLES, sample)
    _wait(lambda: len(state.samples(run_id, 0)) == half, 240, "half the samples stored", trainer)
    trainer.kill()

    # 2. the rest arrives while it is down; restarted, then killed again mid-training
    for sample in samples[half:] + samples[half : half + 2]:
        publish(client, STREAM_SAMPLES, sample)
    publish(client, STREAM_SAMPLES, IterationComplete(run_id=run_id, iteration=0, stage="reward", count=len(samples)))
    metrics = runs / run_id / "train_metrics.jsonl"
    trainer = start("trainer-2")
    _wait(lambda: metrics.exists() and metrics.read_text().count("\n") >= 1, 300, "the first training step", trainer,
          interval=0.02)  # fmt: skip
    trainer.kill()
    store = AdapterStore(adapters)
    assert not store.exists(run_id, adapter_version(0)), "killed mid-iteration: no adapter yet"
    assert metrics.read_text().count("\n") < len(samples) // 2, "killed before the epoch ended"

    # 3. restarted: completes the iteration once
    trainer = start("trainer-3")
    try:
        _wait(lambda: 0 in state.done(run_id), 300, "the iteration to finish", trainer)
    finally:
        trainer.stop()
    published = sorted(s.sample_id for s in samples)
    trained = json.loads((store.path(run_id, "iter-0000") / "trainer_state.json").read_text())["sample_ids"]
    assert trained == published
    assert sorted(r["sample_id"] for r in read_samples_file(samples_file(runs, run_id, 0))) == published
    (event,) = _adapter_events(client, run_id)
    assert event.checksum == adapter_checksum(store.path(run_id, "iter-0000"))
    attempts = {json.loads(line)["attempt"] for line in metrics.read_text().splitlines()}
    assert len(attempts) == 2  # the killed attempt and the one that finished
    client.close()


def test_samples_from_a_stale_adapter_are_counted_and_not_trained(redis_client, trainer_settings):
    """Iteration 1 is on-policy from iter-0000; with the default max_staleness 0 its base samples are dropped."""
    client = redis_client
    run_id = f"s-{uuid.uuid4().hex[:8]}"
    save_run_config(client, RunConfig(run_id=run_id, iterations=2, queries_per_iteration=1, responses_per_query=4))
    settings = trainer_settings.model_copy(update={"batch_size": 4, "block_ms": 100, "consumer": f"c-{run_id}"})
    first = [s.model_copy(update={"adapter_version": "base"}) for s in _samples(run_id, 0, groups=1)]
    second = _samples(run_id, 1, groups=1)
    second = [s.model_copy(update={"adapter_version": "iter-0000" if i < 2 else "base"}) for i, s in enumerate(second)]
    for iteration, batch in ((0, first), (1, second)):
        for sample in batch:
            publish(client, STREAM_SAMPLES, sample)
        publish(client, STREAM_SAMPLES, IterationComplete(run_id=run_id, iteration=iteration, stage="reward", count=len(batch)))
    worker = TrainerWorker(settings, client)
    _run_until_done(worker, run_id, 1, timeout=300)

    records = worker.state.done(run_id)
    assert (records[0]["samples"], records[0]["stale"]) == (4, 0)  # iteration 0 samples the base: on-policy
    assert (records[1]["samples"], records[1]["stale"]) == (2, 2)
    path = AdapterStore(settings.adapter_root).path(run_id, "iter-0001")
    assert json.loads((path / "trainer_state.json").read_text())["sample_ids"] == sorted(s.sample_id for s in second[:2])
