"""The reward's GPU memory cap (GRACE_REWARD_GPU_MEMORY_FRACTION), used when it shares a GPU with vLLM.

No GPU needed: torch.cuda's setter is replaced by a recorder, so the tests check what the scorer asks
PyTorch for, and that it asks before the first model is loaded.
"""

from __future__ import annotations

from types import SimpleNamespace

import pydantic
import pytest
import torch

from services.reward import scorer as scorer_module
from services.reward.config import RewardSettings
from services.reward.scorer import Scorer, apply_memory_cap


@pytest.fixture
def recorded(monkeypatch):
    calls: list[tuple[float, int]] = []
    monkeypatch.setattr(
        torch.cuda,
        "set_per_process_memory_fraction",
        lambda f, d=None: calls.append((f, d)),
    )
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return calls


def test_cap_set_on_the_scorers_cuda_device(recorded):
    assert apply_memory_cap(0.28, torch.device("cuda:1")) == 0.28
    assert apply_memory_cap(0.3, torch.device("cuda")) == 0.3  # plain "cuda": the current device
    assert recorded == [(0.28, 1), (0.3, 0)]


def test_no_cap_unless_set_and_never_on_cpu(recorded):
    assert apply_memory_cap(None, torch.device("cuda:0")) is None
    assert apply_memory_cap(0.5, torch.device("cpu")) is None  # the CPU variant ignores it (with a warning)
    assert recorded == []


def test_setting_read_from_the_environment_and_bounded(monkeypatch):
    monkeypatch.setenv("GRACE_REWARD_GPU_MEMORY_FRACTION", "0.28")
    assert RewardSettings().gpu_memory_fraction == 0.28
    monkeypatch.delenv("GRACE_REWARD_GPU_MEMORY_FRACTION")
    assert RewardSettings().gpu_memory_fraction is None
    for bad in (0, -0.1, 1.5):
        with pytest.raises(pydantic.ValidationError):
            RewardSettings(gpu_memory_fraction=bad)


def test_scorer_caps_memory_before_loading_any_model(monkeypatch, recorded):
    import transformers

    import shared.tiny_models

    order: list[str] = []

    class Loaded(Exception):
        pass

    def first_load(*args, **kwargs):
        order.append("load")
        raise Loaded

    monkeypatch.setattr(
        shared.tiny_models,
        "resolve_models",
        lambda *a, **k: SimpleNamespace(tokenizer="tok"),
    )
    monkeypatch.setattr(scorer_module, "resolve_dtype", lambda name, device: torch.bfloat16)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", first_load)
    monkeypatch.setattr(scorer_module, "CausalScorer", first_load)
    real_cap = scorer_module.apply_memory_cap
    monkeypatch.setattr(
        scorer_module,
        "apply_memory_cap",
        lambda f, d: (order.append("cap"), real_cap(f, d))[1],
    )

    with pytest.raises(Loaded):
        Scorer(RewardSettings(device="cuda:0", dtype="bf16", gpu_memory_fraction=0.28))
    assert order == ["cap", "load"] and recorded == [(0.28, 0)]
