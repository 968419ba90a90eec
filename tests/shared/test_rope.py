"""One RoPE setting per run (paper 3.6): the pure check, the common settings and the run record."""

import json

import pytest

from services.rollout.config import RolloutSettings
from services.rollout.vllm_server import yarn_overrides
from services.trainer.config import TrainerSettings
from shared.rope import RopeConfig, RopeMismatch, check_rope
from shared.runs import RunConfig


def test_equal_settings_pass_and_an_old_run_is_not_checked():
    check_rope("r1", RopeConfig(), RopeConfig(), "trainer")
    check_rope("r1", RopeConfig(yarn_factor=2, native_window=8192, scope="inference_and_training"),
               RopeConfig(yarn_factor=2.0, native_window=8192, scope="inference_and_training"), "trainer")  # fmt: skip
    check_rope("r1", None, RopeConfig(yarn_factor=1.0), "trainer")  # recorded before runs carried it


def test_mismatch_names_the_run_the_service_and_both_values():
    with pytest.raises(RopeMismatch) as err:
        check_rope("r1", RopeConfig(yarn_factor=1.0), RopeConfig(yarn_factor=4.0), "trainer")
    assert "run r1 asks for yarn_factor=1.0 but the trainer is set to yarn_factor=4.0" in str(err.value)
    assert isinstance(err.value, ValueError)
    with pytest.raises(RopeMismatch) as err:
        check_rope("r2", RopeConfig(native_window=8192, scope="inference_and_training"), RopeConfig(), "rollout service")
    message = str(err.value)
    assert "native_window=8192, scope=inference_and_training" in message
    assert "rollout service is set to native_window=None, scope=inference" in message
    assert "yarn_factor" not in message.split(" (")[0], "only differing fields are named"


def test_scope_decides_where_yarn_applies():
    assert RopeConfig().scope == "inference" and RopeConfig().training_factor() is None  # paper 3.6 default
    assert RopeConfig(scope="inference_and_training").training_factor() == 4.0
    assert RopeConfig(yarn_factor=1.0, scope="inference_and_training").training_factor() is None
    assert RopeConfig().served_window(2048) == 8192
    assert RopeConfig(native_window=8192).served_window(32768) == 32768
    assert RopeConfig(yarn_factor=1.0).served_window(2048) == 2048


def _model(tmp_path, native=32768):
    config = {"model_type": "qwen2", "max_position_embeddings": native,
              "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


def test_common_yaml_reaches_every_service_and_the_vllm_overrides(tmp_path, monkeypatch):
    config = tmp_path / "grace.yaml"
    config.write_text("common:\n  yarn_factor: 2\n  rope_scope: inference_and_training\n")
    monkeypatch.setenv("GRACE_CONFIG", str(config))
    rollout, trainer = RolloutSettings(), TrainerSettings()
    assert rollout.rope() == trainer.rope() == RopeConfig(yarn_factor=2.0, scope="inference_and_training")
    overrides, window = yarn_overrides(rollout, _model(tmp_path))
    assert window == 65536 and overrides["rope_parameters"]["factor"] == 2.0

    monkeypatch.setenv("GRACE_ROLLOUT_NATIVE_WINDOW", "8192")  # a service variable still works (for that service)
    rollout = RolloutSettings()
    overrides, window = yarn_overrides(rollout, _model(tmp_path))
    assert overrides["rope_parameters"]["original_max_position_embeddings"] == 8192
    assert overrides["max_position_embeddings"] == 16384 and window == 16384
    assert TrainerSettings().native_window is None
    with pytest.raises(RopeMismatch, match="native_window=8192"):
        check_rope("r", rollout.rope(), TrainerSettings().rope(), "trainer")


def test_run_config_records_the_rope_and_reads_old_records():
    run = RunConfig(run_id="r1", rope=RolloutSettings(yarn_factor=1.0).rope())
    again = RunConfig.model_validate_json(run.model_dump_json())
    assert again.rope == RopeConfig(yarn_factor=1.0)
    assert RunConfig.model_validate_json('{"run_id": "old"}').rope is None
