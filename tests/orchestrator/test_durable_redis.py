"""Durable Redis (issue #14.4): SIGKILL the stack's Redis mid-iteration, restart it on the same folder and
port, and the run still completes with every published sample trained exactly once.

A stack of its own (rollout on vLLM's CPU build, reward, trainer; no judge): the session stack's Redis is
shared by other tests and must never be killed.
"""

from __future__ import annotations

import io
import json
import threading
import time

import pytest
import redis
from rich.console import Console

from services.orchestrator.loop import RunOptions, SemiOnlineRun
from services.orchestrator.stack import LocalStack, StackConfig
from shared.local_redis import LocalRedis
from shared.runs import RunConfig
from shared.schemas import STREAM_ROLLOUTS, STREAM_SAMPLES, IterationComplete, WeightedSample, decode_message

RUN_ID = "durable"


@pytest.mark.integration  # starts a redis-server
def test_local_redis_keeps_acknowledged_writes_across_a_sigkill_on_the_same_folder_and_port(tmp_path):
    server = LocalRedis(data_dir=tmp_path / "redis").start()
    try:
        client = redis.Redis.from_url(server.url)
        assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
        client.xadd("s", {"n": "1"})
        time.sleep(1.5)  # past one everysec fsync
        first = client.info("server")["run_id"]
        server.kill()
        assert not server.alive()
        with pytest.raises(redis.ConnectionError):
            redis.Redis.from_url(server.url, retry=None).ping()
        server.start()
        assert client.xlen("s") == 1 and client.info("server")["run_id"] != first  # same URL, a new server
    finally:
        server.stop()


def _stack(work, tiny_models) -> LocalStack:
    return LocalStack(
        StackConfig(
            stack_dir=work / "stack",
            services=("rollout", "reward", "trainer"),
            common={
                "policy_model": str(tiny_models.policy),
                "general_model": str(tiny_models.general),
                "domain_model": str(tiny_models.domain),
                "embedding_model": str(tiny_models.embedding),
                "adapter_root": str(work / "adapters"),
                "run_root": str(work / "runs"),
            },
            per_service={
                "rollout": {"max_tokens": 64, "generation_max_tokens": 64, "generation_attempts": 2},
                # an ack lost with the AOF's last second is reclaimed after 5 s, not the default minute
                "reward": {"min_idle_ms": 5000, "lock_ttl_ms": 10000},
                "trainer": {"lora_rank": 8, "lora_alpha": 16, "batch_size": 4, "min_idle_ms": 5000},
            },
        )
    )


def _kill_redis_when_reward_starts(stack: LocalStack, url: str, killed: threading.Event, stop: threading.Event) -> None:
    """SIGKILLs Redis as soon as iteration 0's rollout marker is on the stream (the reward stage has begun)."""
    client = redis.Redis.from_url(url)
    while not stop.is_set():
        try:
            rows = [decode_message(f) for _, f in client.xrange(STREAM_ROLLOUTS)]
        except redis.RedisError:
            rows = []
        if any(isinstance(p, IterationComplete) and p.run_id == RUN_ID and p.iteration == 0 for p in rows):
            stack.kill("redis")
            killed.set()
            return
        stop.wait(0.1)


def test_a_run_survives_a_redis_sigkill_mid_iteration_and_trains_every_sample_once(tmp_path, tiny_models):
    stack = _stack(tmp_path, tiny_models)
    info = stack.up()
    stop, killed = threading.Event(), threading.Event()
    threads = [
        threading.Thread(target=stack.supervise, kwargs={"interval": 0.5, "stop": stop}, daemon=True),
        threading.Thread(target=_kill_redis_when_reward_starts, args=(stack, info.redis_url, killed, stop), daemon=True),
    ]
    try:
        for thread in threads:
            thread.start()
        config = RunConfig(run_id=RUN_ID, iterations=2, queries_per_iteration=2, responses_per_query=2)
        options = RunOptions(config=config, run_dir=tmp_path / "runs" / RUN_ID, eval_limit=1, eval_max_tokens=32,
                             stage_timeout_s=600)  # fmt: skip
        console = Console(file=io.StringIO(), width=200)
        run = SemiOnlineRun(options, info, console)
        run.run()
        assert killed.is_set()
        assert "iteration 0: Redis restarted; re-running the rollout stage" in console.file.getvalue()
        assert run.state.trained == [0, 1]
        # only Redis came back from the dead: reward, trainer and rollout rode the outage out in-process
        assert stack.restarts == {"redis": 1}
        client = redis.Redis.from_url(info.redis_url)
        samples = [decode_message(f) for _, f in client.xrange(STREAM_SAMPLES)]
        for iteration in (0, 1):
            published = {s.sample_id for s in samples if isinstance(s, WeightedSample) and s.iteration == iteration}
            assert len(published) == 2 * 2  # K x m
            state = json.loads((tmp_path / "adapters" / RUN_ID / f"iter-{iteration:04d}" / "trainer_state.json").read_text())
            assert len(state["sample_ids"]) == len(set(state["sample_ids"]))  # none trained twice
            assert set(state["sample_ids"]) == published  # none lost
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
        stack.down()
