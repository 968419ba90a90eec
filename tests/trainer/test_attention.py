"""The trainer's attention on CUDA without flash-attn (``grace_fused_sdpa``): the same numbers as
transformers' SDPA path, here on CPU, where both run (the kernel choice it exists for is a GPU matter:
scripts/gpu_check.py --checks attention)."""

from __future__ import annotations

import torch

from services.trainer.config import TrainerSettings
from services.trainer.model import FUSED_SDPA, Sequence, fused_sdpa_attention, load_policy, resolve_runtime, sequence_logps


class _Module(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 4
    training = False


def test_fused_sdpa_equals_transformers_sdpa_on_grouped_heads():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    query, key, value = torch.randn(2, 8, 12, 16), torch.randn(2, 2, 12, 16), torch.randn(2, 2, 12, 16)
    reference, _ = sdpa_attention_forward(_Module(), query, key, value, None, scaling=0.25)
    fused, _ = fused_sdpa_attention(_Module(), query, key, value, None, scaling=0.25, dtype=torch.float32)
    assert fused.shape == reference.shape == (2, 12, 8, 16)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)
    # causal: the first position attends to itself only, so it equals its value row (of its K/V group)
    torch.testing.assert_close(fused[:, 0, :4], value[:, 0, :1].expand(-1, 4, -1), rtol=1e-5, atol=1e-5)


def test_fused_sdpa_casts_to_the_compute_dtype():
    query, key, value = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    out, _ = fused_sdpa_attention(_Module(), query, key, value, None, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16


def test_policy_with_fused_sdpa_gives_the_sdpa_log_probabilities(tiny_models):
    sequences = [Sequence(ids=list(range(10, 70)), prompt_len=8), Sequence(ids=list(range(40, 75)), prompt_len=5)]
    logps = {}
    for attn in ("sdpa", FUSED_SDPA):
        settings = TrainerSettings(policy_model=str(tiny_models.policy), attn_implementation=attn, precision="fp32")
        runtime = resolve_runtime(settings)
        assert runtime.attn_implementation == attn
        model, tokenizer, runtime = load_policy(settings, runtime)
        with torch.no_grad():
            logps[attn] = sequence_logps(model, sequences, 0, runtime)
    torch.testing.assert_close(logps[FUSED_SDPA], logps["sdpa"], rtol=1e-5, atol=1e-4)
