from typing import ClassVar

import pytest
import torch
from safetensors.torch import save_file

from shared.adapters import AdapterStore, adapter_checksum, adapter_rank
from shared.local_redis import LocalRedis
from shared.schemas import AdapterEvent, RolloutGroup, decode_message, encode_message
from shared.settings import ServiceSettings, service_config


class DemoSettings(ServiceSettings):
    section: ClassVar[str] = "demo"
    model_config = service_config("GRACE_DEMO_")
    batch_size: int = 8


def test_env_prefix_yaml_and_precedence(tmp_path, monkeypatch):
    config = tmp_path / "grace.yaml"
    config.write_text("common:\n  run_id: from-yaml\n  batch_size: 2\ndemo:\n  batch_size: 4\nother:\n  batch_size: 99\n")
    monkeypatch.setenv("GRACE_CONFIG", str(config))
    monkeypatch.setenv("REDIS_URL", "redis://plain:6379/0")
    settings = DemoSettings()
    assert settings.run_id == "from-yaml" and settings.batch_size == 4  # service section beats common
    assert settings.redis_url == "redis://plain:6379/0"
    monkeypatch.setenv("GRACE_DEMO_BATCH_SIZE", "16")
    monkeypatch.setenv("GRACE_DEMO_REDIS_URL", "redis://prefixed:6379/0")
    monkeypatch.setenv("GRACE_DEMO_API_KEY", "s3cret")
    settings = DemoSettings()
    assert settings.batch_size == 16 and settings.redis_url == "redis://prefixed:6379/0"
    assert settings.api_key_value() == "s3cret" and "s3cret" not in repr(settings)


def test_general_model_is_a_base_model_and_falling_back_to_the_policy_warns_once(caplog, monkeypatch):
    for key in ("GRACE_DEMO_GENERAL_MODEL", "GRACE_DEMO_POLICY_MODEL", "GRACE_CONFIG"):
        monkeypatch.delenv(key, raising=False)
    assert DemoSettings().general_model_path() is None  # the local set's base model (the policy before SFT)
    assert DemoSettings(policy_model="/sft", general_model="/base").general_model_path() == "/base"
    with caplog.at_level("WARNING", logger="shared.settings"):
        for _ in range(3):
            assert DemoSettings(policy_model="/sft-warn-once").general_model_path() == "/sft-warn-once"
    warnings = [r.getMessage() for r in caplog.records if "general_model_is_policy" in r.getMessage()]
    assert len(warnings) == 1 and "GRACE_DEMO_GENERAL_MODEL" in warnings[0]


def test_one_model_preset_for_every_service_and_the_old_names_still_work(tmp_path, monkeypatch, tiny_models):
    from services.reward.config import RewardSettings
    from services.rollout.config import RolloutSettings
    from services.trainer.config import TrainerSettings

    for key in ("GRACE_CONFIG", "GRACE_ROLLOUT_TINY_PRESET", "GRACE_REWARD_PRESET", "GRACE_TRAINER_POLICY_MODEL"):
        monkeypatch.delenv(key, raising=False)
    config = tmp_path / "grace.yaml"
    config.write_text("common:\n  model_preset: small\n")
    monkeypatch.setenv("GRACE_CONFIG", str(config))
    # the bug this setting fixes: a `small` rollout trained adapters on the trainer's tiny base
    assert {cls().model_preset for cls in (RolloutSettings, RewardSettings, TrainerSettings)} == {"small"}
    config.write_text("rollout:\n  tiny_preset: small\n")
    with pytest.warns(FutureWarning, match=r"tiny_preset \(GRACE_ROLLOUT_TINY_PRESET\) is deprecated"):
        assert RolloutSettings().model_preset == "small"  # the old YAML key
    monkeypatch.delenv("GRACE_CONFIG")
    assert TrainerSettings().policy_path() == str(tiny_models.policy)  # unset: the local set's policy
    assert TrainerSettings(policy_model="/models/p").policy_path() == "/models/p"
    monkeypatch.setenv("GRACE_ROLLOUT_TINY_PRESET", "small")
    monkeypatch.setenv("GRACE_REWARD_PRESET", "small")
    with pytest.warns(FutureWarning, match="use model_preset"):
        assert RolloutSettings().model_preset == RewardSettings().model_preset == "small"
    with pytest.warns(FutureWarning, match=r"GRACE_REWARD_PRESET\) is deprecated: use model_preset \(GRACE_REWARD_MODEL"):
        assert RolloutSettings(model_preset="tiny").model_preset == "tiny"  # the new name wins
        assert RewardSettings(preset="tiny").model_preset == "tiny"  # the old argument too
    monkeypatch.setenv("GRACE_REWARD_PRESET", "huge")
    with pytest.raises(ValueError, match="model_preset"):
        RewardSettings()


def test_bad_yaml_names_the_file(tmp_path, monkeypatch):
    config = tmp_path / "bad.yaml"
    config.write_text("- a list\n")
    monkeypatch.setenv("GRACE_CONFIG", str(config))
    with pytest.raises(ValueError, match="bad.yaml"):
        DemoSettings()


def test_message_roundtrip_and_validation():
    group = RolloutGroup(run_id="r", iteration=1, group_id="r:1:0", group_index=0, query="q", responses=["x"])
    assert decode_message({k.encode(): v.encode() for k, v in encode_message(group).items()}) == group
    with pytest.raises(ValueError):
        AdapterEvent(run_id="r", iteration=0, version="../evil", path="/x", checksum="c", rank=8)


def _fake_adapter(path, rank=8):
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(f'{{"r": {rank}, "rank_pattern": {{"q_proj": {rank * 2}}}}}')
    save_file({"w": torch.ones(2)}, str(path / "adapter_model.safetensors"))


def test_adapter_store_atomic_write_and_no_rewrite(tmp_path):
    store = AdapterStore(tmp_path / "store")
    path, checksum = store.write("run", "iter-0001", _fake_adapter)
    assert path == store.path("run", "iter-0001") and store.exists("run", "iter-0001")
    assert checksum == adapter_checksum(path) and adapter_rank(path) == 16
    with pytest.raises(FileExistsError):
        store.write("run", "iter-0001", _fake_adapter)
    assert [p.name for p in path.parent.iterdir()] == ["iter-0001"]  # no temp folders left


def test_adapter_store_failed_save_leaves_nothing(tmp_path):
    store = AdapterStore(tmp_path)

    def broken(folder):
        (folder / "adapter_config.json").write_text("{}")
        raise OSError("disk full")

    with pytest.raises(OSError):
        store.write("run", "v1", broken)
    assert not store.exists("run", "v1") and list((tmp_path / "run").iterdir()) == []
    assert store.contains(tmp_path / "run" / "v1") and not store.contains(tmp_path / ".." / "elsewhere")


def test_checksum_changes_with_content(tmp_path):
    _fake_adapter(tmp_path / "a")
    _fake_adapter(tmp_path / "b", rank=4)
    assert adapter_checksum(tmp_path / "a") != adapter_checksum(tmp_path / "b")


def test_local_redis_stops_cleanly(tmp_path):
    import redis

    server = LocalRedis(data_dir=tmp_path).start()
    client = redis.Redis.from_url(server.url)
    client.set("k", "v")
    pid = server.process.pid
    server.stop()
    with pytest.raises(redis.ConnectionError):
        client.ping()
    import os

    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert (tmp_path / "appendonlydir").exists() or (tmp_path / "appendonly.aof").exists()
