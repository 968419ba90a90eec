"""The trainer's adapter, published on the stream, is loaded by the real vLLM CPU server and serves `policy`."""

from __future__ import annotations

import time
import uuid

import httpx
import redis

from services.trainer.worker import TrainerWorker
from shared.schemas import STREAM_ADAPTERS, STREAM_SAMPLES, AdapterStatus, IterationComplete, decode_message
from shared.streams import publish
from tests.fixtures.rollout import REPLICA
from tests.trainer.test_worker import _run_until_done, _samples


def _status(client: redis.Redis, run_id: str, version: str, timeout: float = 120) -> AdapterStatus:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for _, fields in client.xrange(STREAM_ADAPTERS):
            payload = decode_message(fields)
            if isinstance(payload, AdapterStatus) and (payload.run_id, payload.version, payload.replica) == (
                run_id,
                version,
                REPLICA,
            ):
                return payload
        time.sleep(0.2)
    raise AssertionError(f"no AdapterStatus for {run_id}/{version}")


def test_trained_adapter_hot_swaps_into_vllm(rollout_service, trainer_settings):
    client = redis.Redis.from_url(rollout_service.redis_url)
    run_id = f"vllm-{uuid.uuid4().hex[:8]}"
    settings = trainer_settings.model_copy(
        update={"adapter_root": rollout_service.adapter_root, "batch_size": 4, "block_ms": 100, "consumer": f"c-{run_id}",
                "learning_rate": 5e-2}  # large enough that the adapter visibly changes the policy
    )  # fmt: skip
    samples = _samples(run_id, 0, groups=2)
    for sample in samples:
        publish(client, STREAM_SAMPLES, sample)
    publish(client, STREAM_SAMPLES, IterationComplete(run_id=run_id, iteration=0, stage="reward", count=len(samples)))
    _run_until_done(TrainerWorker(settings, client), run_id, 0)

    status = _status(client, run_id, "iter-0000")
    assert status.status == "loaded", status.reason
    reply = httpx.post(
        rollout_service.openai_base_url + "/chat/completions", headers=rollout_service.headers(), timeout=120,
        json={"model": "policy", "messages": [{"role": "user", "content": "Write a report"}], "max_tokens": 8, "temperature": 0},
    )  # fmt: skip
    reply.raise_for_status()
    assert reply.headers.get("x-grace-adapter-version") == "iter-0000"
    assert reply.json()["choices"][0]["message"]["content"] is not None
    client.close()
