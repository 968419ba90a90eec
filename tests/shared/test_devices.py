"""Device and dtype resolution, written once for the reward, the trainer, the context study and the rollout."""

import pytest
import torch

from shared.devices import cpu_has_native_bf16, resolve_device, resolve_dtype

CPU = torch.device("cpu")


def test_explicit_names_win_and_auto_follows_the_machine():
    assert resolve_device("cpu") == CPU and resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("fp32", torch.device("cuda", 0)) == torch.float32
    assert resolve_dtype("bf16", CPU, cpu_bf16=False) == torch.bfloat16


def test_auto_on_cpu_is_bf16_only_for_inference_on_native_bf16():
    native = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert resolve_dtype("auto", CPU) == native  # the reward
    assert resolve_dtype("auto", CPU, cpu_bf16=False) == torch.float32  # the trainer and the context study


def test_unknown_dtype_names_the_choices():
    with pytest.raises(ValueError, match="auto, bf16 or fp32"):
        resolve_dtype("fp16", CPU)
