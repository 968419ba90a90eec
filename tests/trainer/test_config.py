"""Settings carry the paper's defaults; env overrides; DeepSpeed configs fill their "auto" fields."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.trainer.config import TrainerSettings
from services.trainer.train import deepspeed_config

DEEPSPEED_DIR = Path(__file__).resolve().parents[2] / "services" / "trainer" / "deepspeed"


def test_paper_defaults(monkeypatch):
    for key in list(__import__("os").environ):
        if key.startswith("GRACE_TRAINER_"):
            monkeypatch.delenv(key)
    s = TrainerSettings()
    assert (s.beta, s.sft_weight, s.learning_rate, s.min_learning_rate, s.warmup_ratio) == (0.05, 0.1, 5e-6, 1e-6, 0.1)
    assert (s.batch_size, s.epochs, s.lora_rank, s.lora_alpha, s.loss, s.lambda_mode) == (8, 1, 64, 128, "grace_kto", "balanced")
    assert TrainerSettings.model_fields["beta"].description  # self-documenting
    assert s.lr_schedule == "per_iteration" and "floor" in TrainerSettings.model_fields["lr_schedule"].description


def test_run_long_lr_schedule_is_refused_under_deepspeed():
    with pytest.raises(ValueError, match="not supported under DeepSpeed"):
        TrainerSettings(lr_schedule="run", deepspeed=DEEPSPEED_DIR / "zero2.json")
    assert TrainerSettings(lr_schedule="run").lr_schedule == "run"


def test_env_overrides(monkeypatch):
    monkeypatch.setenv("GRACE_TRAINER_BETA", "0.2")
    monkeypatch.setenv("GRACE_TRAINER_LORA_TARGET_MODULES", '["q_proj","v_proj"]')
    s = TrainerSettings()
    assert s.beta == 0.2 and s.lora_target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize("name,stage", [("zero2.json", 2), ("zero3.json", 3)])
def test_deepspeed_configs_fill_auto_fields(name, stage):
    config = deepspeed_config(DEEPSPEED_DIR / name, TrainerSettings(max_grad_norm=0.5), micro_batch_size=4)
    assert config["zero_optimization"]["stage"] == stage
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["train_batch_size"] == 4
    assert config["gradient_clipping"] == 0.5 and config["gradient_accumulation_steps"] == 1
    assert "auto" not in json.dumps(config)
    # the files name no optimizer: ZeRO must accept the client AdamW (it raises "requires an optimizer" without one)
    assert "optimizer" not in config and config["zero_allow_untested_optimizer"] is True
