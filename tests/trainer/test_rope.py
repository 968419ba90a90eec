"""The trainer side of one RoPE setting per run (paper 3.6): YaRN at load only with the training scope,
a run with other RoPE values refused by the worker and by SFT."""

from __future__ import annotations

import logging
import uuid

import pytest
import redis

from services.trainer.model import model_config
from services.trainer.worker import TrainerWorker
from shared.adapters import AdapterStore
from shared.rope import RopeConfig, RopeMismatch
from shared.runs import RunConfig, save_run_config
from shared.schemas import STREAM_SAMPLES, IterationComplete
from shared.streams import publish
from tests.trainer.test_worker import _samples


def test_inference_scope_trains_with_native_rope(tiny_models, trainer_settings):
    assert trainer_settings.rope().scope == "inference"  # the default: YaRN in vLLM only
    config = model_config(tiny_models.policy, trainer_settings.rope())
    assert config.rope_parameters.get("rope_type") in (None, "default")
    assert config.max_position_embeddings == 2048


def test_training_scope_applies_yarn_with_the_native_window_override(tiny_models, trainer_settings):
    settings = trainer_settings.model_copy(update={"rope_scope": "inference_and_training", "native_window": 1024})
    config = model_config(tiny_models.policy, settings.rope())
    assert config.rope_parameters["rope_type"] == "yarn" and config.rope_parameters["factor"] == 4.0
    assert config.rope_parameters["original_max_position_embeddings"] == 1024
    assert config.max_position_embeddings == 4096
    plain = model_config(tiny_models.policy, RopeConfig(scope="inference_and_training"))
    assert plain.rope_parameters["original_max_position_embeddings"] == 2048 and plain.max_position_embeddings == 8192


def test_worker_refuses_a_run_with_other_rope_and_trains_nothing(redis_url, trainer_settings, caplog):
    client = redis.Redis.from_url(redis_url)
    run_id = f"rope-{uuid.uuid4().hex[:8]}"
    settings = trainer_settings.model_copy(update={"batch_size": 4, "block_ms": 100, "consumer": f"c-{run_id}"})
    save_run_config(client, RunConfig(run_id=run_id, iterations=1, rope=RopeConfig(yarn_factor=1.0)))
    samples = _samples(run_id, 0, groups=1)
    for sample in samples:
        publish(client, STREAM_SAMPLES, sample)
    publish(client, STREAM_SAMPLES, IterationComplete(run_id=run_id, iteration=0, stage="reward", count=len(samples)))
    worker = TrainerWorker(settings, client)
    with caplog.at_level(logging.ERROR, logger="services.trainer.worker"):
        for _ in range(3):
            assert worker.run_once(block_ms=100) == 0
    expected = f"run {run_id} asks for yarn_factor=1.0 but the trainer is set to yarn_factor=4.0"
    assert expected in worker.refused[run_id]
    logged = [r.getMessage() for r in caplog.records if "event=rope_mismatch" in r.getMessage()]
    assert len(logged) == 1 and expected in logged[0], "logged once, then the run is skipped"
    assert worker._policy is None and worker.trained == 0, "nothing loaded, nothing trained"
    assert 0 not in worker.state.done(run_id) and not AdapterStore(settings.adapter_root).exists(run_id, "iter-0000")

    # not marked done: a trainer set like the run trains it
    matching = TrainerWorker(settings.model_copy(update={"yarn_factor": 1.0}), client)
    assert matching.run_once(block_ms=100) == 1 and 0 in matching.state.done(run_id)
    client.close()


def test_sft_refuses_a_run_with_other_rope(tiny_models, tmp_path):
    from services.trainer.sft import SftOptions, run_sft

    opts = SftOptions(out=tmp_path / "sft", base=str(tiny_models.policy), rope=RopeConfig(scope="inference_and_training"),
                      run_id="r1")  # fmt: skip
    with pytest.raises(
        RopeMismatch, match="run r1 asks for scope=inference_and_training but the SFT stage is set to scope=inference"
    ):
        run_sft(opts)
    assert not (tmp_path / "sft").exists()
