"""The vLLM command line built from settings: YaRN, window, LoRA, KV cache, GPU flags."""

import json

import pytest

from services.rollout.config import RolloutSettings
from services.rollout.vllm_server import vllm_command


def _model(tmp_path, **config):
    rope = {"rope_type": "default", "rope_theta": 500000.0}
    base = {"model_type": "qwen2", "max_position_embeddings": 8192, "rope_parameters": rope}
    base.update(config)
    (tmp_path / "config.json").write_text(json.dumps(base))
    return str(tmp_path)


def _flag(argv, name):
    return argv[argv.index(name) + 1]


def test_yarn_quadruples_an_8k_window_and_repeats_rope_theta(tmp_path):
    argv, env = vllm_command(RolloutSettings(), _model(tmp_path), 9000, cuda=False)
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert _flag(argv, "--max-model-len") == "32768"
    overrides = json.loads(_flag(argv, "--hf-overrides"))
    assert overrides == {
        "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192, "rope_theta": 500000.0},
        "max_position_embeddings": 32768,
    }
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert _flag(argv, "--max-lora-rank") == "64" and int(_flag(argv, "--max-loras")) >= 2
    assert "--enable-prefix-caching" in argv and _flag(argv, "--kv-cache-memory-bytes") == "256M"
    assert "--tensor-parallel-size" not in argv
    assert "--no-enable-chunked-prefill" in argv and _flag(argv, "--max-num-batched-tokens") == "32768"  # CPU seed bug


def test_transformers4_layout_and_native_window_override(tmp_path):
    model = _model(tmp_path, rope_parameters=None, rope_theta=1e6, max_position_embeddings=32768)
    argv, _ = vllm_command(RolloutSettings(native_window=8192), model, 9000, cuda=False)
    overrides = json.loads(_flag(argv, "--hf-overrides"))
    assert overrides["rope_parameters"]["rope_theta"] == 1e6
    assert overrides["rope_parameters"]["original_max_position_embeddings"] == 8192
    assert _flag(argv, "--max-model-len") == "32768"


def test_yarn_off_keeps_the_native_window(tmp_path):
    argv, _ = vllm_command(RolloutSettings(yarn_factor=1.0), _model(tmp_path), 9000, cuda=False)
    assert "--hf-overrides" not in argv and _flag(argv, "--max-model-len") == "8192"


@pytest.mark.parametrize("kv", [None, "1G"])
def test_gpu_flags(tmp_path, kv):
    settings = RolloutSettings(tensor_parallel_size=2, kv_cache_bytes=kv, gpu_memory_utilization=0.85)
    argv, _ = vllm_command(settings, _model(tmp_path), 9000, cuda=True)
    assert _flag(argv, "--tensor-parallel-size") == "2"
    assert "--no-enable-chunked-prefill" not in argv
    if kv is None:
        assert _flag(argv, "--gpu-memory-utilization") == "0.85" and "--kv-cache-memory-bytes" not in argv
    else:
        assert _flag(argv, "--kv-cache-memory-bytes") == "1G"


def test_settings_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("GRACE_ROLLOUT_YARN_FACTOR", "2")
    monkeypatch.setenv("GRACE_ROLLOUT_MAX_LORA_RANK", "16")
    argv, _ = vllm_command(RolloutSettings(), _model(tmp_path), 9000, cuda=False)
    assert _flag(argv, "--max-model-len") == "16384" and _flag(argv, "--max-lora-rank") == "16"
