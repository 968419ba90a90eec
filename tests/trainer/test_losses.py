"""The loss math alone: GRACE-KTO vs TRL's own KTO code, gradients, baselines, planning."""

from __future__ import annotations

import math
import types
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F

from services.trainer import losses
from services.trainer.batching import (
    cosine_lr,
    iteration_steps,
    mismatched_partners,
    plan_batches,
    run_schedule,
)
from services.trainer.model import token_logps

# --------------------------------------------------------------------------- equality with TRL


class TableLM(torch.nn.Module):
    """A causal "LM" whose log-prob of token v is a learnable table entry, returning TRL's fused-head output.

    It lets TRL's own ``KTOTrainer._compute_loss`` run on log-probabilities the test knows exactly.
    """

    def __init__(self, vocab: int, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(-torch.rand(vocab, generator=generator, dtype=torch.float64) * 3)

    def forward(self, input_ids, attention_mask=None, labels=None, fused_lm_head=False, **kwargs):
        from trl.trainer.utils import FusedCausalLMOutput

        assert fused_lm_head
        next_labels = labels[:, 1:]
        mask = next_labels != -100
        log_probs = self.table[next_labels.clamp(min=0)] * mask
        zeros = torch.zeros_like(log_probs)
        return FusedCausalLMOutput(log_probs=log_probs, entropy=zeros, mean_logits=zeros, label_mask=mask)


def _trl_kto_batch(labels: list[bool], vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """A collated KTO batch (as TRL's DataCollatorForUnpairedPreference builds it) with precomputed ref log-probs."""
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    generator = torch.Generator().manual_seed(seed)
    examples = []
    completions = []
    for label in labels:
        prompt = torch.randint(1, vocab, (int(torch.randint(3, 7, (1,), generator=generator)),), generator=generator)
        completion = torch.randint(1, vocab, (int(torch.randint(2, 9, (1,), generator=generator)),), generator=generator)
        completions.append(completion.tolist())
        examples.append({"prompt_ids": prompt.tolist(), "completion_ids": completion.tolist(), "label": label})
    for k, example in enumerate(examples):  # TRL's rotation by one for the KL pairs
        example["KL_completion_ids"] = completions[k - 1]
        example["ref_logps"] = float(-torch.rand(1, generator=generator) * 10)
        example["ref_KL_logps"] = float(-torch.rand(1, generator=generator) * 10)
    return DataCollatorForUnpairedPreference(pad_token_id=0)(examples)


def _trl_loss(model: TableLM, batch: dict, beta: float, lambda_d: float, lambda_u: float) -> tuple[torch.Tensor, float]:
    """TRL 1.16's ``KTOTrainer._compute_loss`` on ``batch``: its own code, bound to a minimal trainer state."""
    from trl.trainer.kto_trainer import KTOTrainer

    state = types.SimpleNamespace(
        model=model, precompute_ref_logps=True, calculate_KL=True, loss_type="kto", beta=beta,
        desirable_weight=lambda_d, undesirable_weight=lambda_u, aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
        accelerator=types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x),
    )  # fmt: skip
    state._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, state)
    loss = KTOTrainer._compute_loss(state, model, batch, return_outputs=False)
    return loss, state._metrics["train"]["kl"][-1]


def _summed(model: TableLM, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Sequence log-probs summed over completion tokens, computed independently of TRL."""
    return (model.table[input_ids[:, 1:]] * completion_mask[:, 1:]).sum(-1)


@pytest.mark.parametrize(
    ("labels", "beta", "lambdas"),
    [
        ([True, False, True, True, False, False, True, False], 0.1, (1.0, 1.0)),
        ([True, True, True, False, True, True], 0.05, (1.0, 5.0)),  # balanced: lambda- = 5/1
        ([False, False, True, False], 0.5, (3.0, 1.0)),
    ],
)
def test_grace_kto_equals_trl_kto_with_unit_weights(labels, beta, lambdas):
    vocab = 50
    batch = _trl_kto_batch(labels, vocab, seed=len(labels))
    trl_model, our_model = TableLM(vocab, 7), TableLM(vocab, 7)

    trl_loss, trl_kl = _trl_loss(trl_model, batch, beta, *lambdas)
    trl_loss.backward()

    policy = _summed(our_model, batch["input_ids"], batch["completion_mask"])
    policy_kl = _summed(our_model, batch["KL_input_ids"], batch["KL_completion_mask"])
    z_ref = losses.kl_reference_point(policy_kl, batch["ref_KL_logps"].to(policy_kl.dtype))
    weights = torch.where(batch["label"], 1.0, -1.0)
    ours = losses.grace_kto_loss(policy, batch["ref_logps"].to(policy.dtype), weights, z_ref, beta, *lambdas)
    ours.backward()

    assert float(trl_loss.detach()) > 0.01
    assert float(ours.detach()) == pytest.approx(float(trl_loss.detach()), rel=1e-9, abs=1e-12)
    assert float(z_ref) == pytest.approx(trl_kl, rel=1e-6, abs=1e-9)
    assert torch.allclose(our_model.table.grad, trl_model.table.grad, rtol=1e-9, atol=1e-12)
    assert trl_model.table.grad.abs().sum() > 0


def test_binary_kto_is_grace_kto_with_signs_only():
    policy, ref = torch.tensor([-5.0, -7.0, -3.0]), torch.tensor([-6.0, -6.5, -3.5])
    z = torch.tensor(0.2)
    weights = torch.tensor([2.5, -0.3, 0.0])
    binary = losses.kto_loss(policy, ref, weights >= 0, z, 0.1, 1.0, 2.0)
    unit = losses.grace_kto_loss(policy, ref, torch.tensor([1.0, -1.0, 1.0]), z, 0.1, 1.0, 2.0)
    weighted = losses.grace_kto_loss(policy, ref, weights, z, 0.1, 1.0, 2.0)
    assert float(binary) == pytest.approx(float(unit))
    assert float(binary) != pytest.approx(float(weighted))


# --------------------------------------------------------------------------- gradients


def _grad(weights: list[float], policy: list[float], ref: list[float], z: float = 0.0) -> torch.Tensor:
    p = torch.tensor(policy, dtype=torch.float64, requires_grad=True)
    loss = losses.grace_kto_loss(p, torch.tensor(ref, dtype=torch.float64), torch.tensor(weights, dtype=torch.float64),
                                 torch.tensor(z, dtype=torch.float64), 0.05, 1.0, 1.0)  # fmt: skip
    loss.backward()
    return p.grad


def test_gradient_raises_desirable_and_lowers_undesirable_in_proportion_to_weight():
    # same log-ratio everywhere, so only W differs
    weights = [0.5, 2.0, -0.5, -2.0]
    grad = _grad(weights, [-10.0] * 4, [-10.0] * 4)
    step = -grad  # gradient descent moves log-probs along -grad
    assert step[0] > 0 and step[1] > 0, "desirable log-ratios must rise"
    assert step[2] < 0 and step[3] < 0, "undesirable log-ratios must fall"
    assert float(step[1] / step[0]) == pytest.approx(4.0)
    assert float(step[3] / step[2]) == pytest.approx(4.0)


def test_zero_weight_contributes_nothing():
    with_zero = _grad([1.0, 0.0, -1.0], [-3.0, -1.0, -4.0], [-3.5, -9.0, -3.0], z=0.3)
    assert with_zero[1] == 0.0
    p = torch.tensor([-3.0, -1.0, -4.0])
    ref = torch.tensor([-3.5, -9.0, -3.0])
    terms = losses.grace_kto_losses(p, ref, torch.tensor([1.0, 0.0, -1.0]), torch.tensor(0.3), 0.05, 1.0, 1.0)
    assert terms[1] == 0.0 and terms[0] > 0 and terms[2] > 0


def test_reference_point_is_detached_clamped_mean():
    policy = torch.tensor([-4.0, -6.0], requires_grad=True)
    z = losses.kl_reference_point(policy, torch.tensor([-5.0, -6.0]))
    assert float(z) == pytest.approx(0.5)
    assert not z.requires_grad
    assert float(losses.kl_reference_point(torch.tensor([-9.0]), torch.tensor([-5.0]))) == 0.0


# --------------------------------------------------------------------------- lambda, baselines


def test_class_weights_balance_the_classes():
    lp, lm = losses.class_weights(30, 10)
    assert lp * 30 == pytest.approx(lm * 10) and min(lp, lm) == 1.0
    lp, lm = losses.class_weights(4, 12)
    assert lp * 4 == pytest.approx(lm * 12) and lm == 1.0
    assert losses.class_weights(5, 0) == (1.0, 1.0)
    assert losses.class_weights(30, 10, "fixed", (0.7, 1.3)) == (0.7, 1.3)
    with pytest.raises(ValueError):
        losses.class_weights(3, 4, "odd")


def test_dpo_loss_matches_formula_and_prefers_chosen():
    pc, pr = torch.tensor([-10.0], requires_grad=True), torch.tensor([-12.0], requires_grad=True)
    rc, rr = torch.tensor([-11.0]), torch.tensor([-11.0])
    loss = losses.dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert float(loss) == pytest.approx(-math.log(1 / (1 + math.exp(-0.1 * 2.0))))
    loss.backward()
    assert pc.grad < 0 and pr.grad > 0


def test_orpo_loss_prefers_chosen():
    pc = torch.tensor([-20.0], requires_grad=True)
    pr = torch.tensor([-30.0], requires_grad=True)
    loss = losses.orpo_loss(pc, pr, torch.tensor([10.0]), torch.tensor([10.0]), alpha=0.1)
    loss.backward()
    assert torch.isfinite(loss) and pc.grad < 0 and pr.grad > 0


def test_sft_loss_is_token_mean_nll():
    assert float(losses.sft_loss(torch.tensor([-6.0, -4.0]), torch.tensor([3, 2]))) == pytest.approx(2.0)
    assert float(losses.sft_loss(torch.tensor([]), torch.tensor([]))) == 0.0


def test_best_worst_pairs_per_group():
    groups = ["a", "a", "a", "b", "b", "c", "d", "d"]
    weights = [0.1, 1.5, -1.0, 0.2, 0.2, 3.0, -1.0, 0.4]
    assert losses.best_worst_pairs(groups, weights) == [(1, 2), (7, 6)]


def test_reward_stats_margin():
    stats = losses.reward_stats(torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -2.0]), torch.tensor([1.0, -1.0]), 0.5)
    assert stats == pytest.approx({"rewards_chosen": 0.5, "rewards_rejected": -0.5, "reward_margin": 1.0})


# --------------------------------------------------------------------------- LM head and planning


def test_tiled_token_logps_match_log_softmax_values_and_gradients():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 37, bias=True).requires_grad_(False)
    hidden = torch.randn(23, 16, dtype=torch.float32, requires_grad=True)
    targets = torch.randint(0, 37, (23,))
    upstream = torch.randn(23)
    ours = token_logps(hidden, head, targets)
    (ours * upstream).sum().backward()
    ours_grad = hidden.grad.clone()
    hidden.grad = None
    plain = F.linear(hidden, head.weight, head.bias).log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    (plain * upstream).sum().backward()
    assert torch.allclose(ours, plain, atol=1e-5)
    assert torch.allclose(ours_grad, hidden.grad, atol=1e-5)


def test_plan_batches_covers_each_sample_once_and_is_seeded():
    batches = plan_batches(19, 8, seed=3)
    assert sorted(i for b in batches for i in b) == list(range(19))
    assert [len(b) for b in batches] == [8, 8, 3]
    assert batches == plan_batches(19, 8, seed=3) and batches != plan_batches(19, 8, seed=4)
    assert mismatched_partners([4, 9, 2]) == [2, 4, 9]


def test_cosine_schedule_warmup_peak_floor():
    total, peak, floor = 20, 5e-6, 1e-6
    lrs = [cosine_lr(s, total, peak, floor, 0.1) for s in range(total)]
    assert lrs[0] == pytest.approx(peak / 2) and lrs[1] == pytest.approx(peak)
    assert lrs[-1] == pytest.approx(floor)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_run_long_schedule_offsets_and_totals():
    from services.trainer.config import TrainerSettings
    from services.trainer.worker import run_steps_estimate
    from shared.runs import RunConfig

    assert iteration_steps(32, 8, 1) == 4 and iteration_steps(33, 8, 1) == 5 and iteration_steps(33, 8, 2) == 10
    assert iteration_steps(0, 8, 3) == 0
    steps = [4, 4, 2]
    assert run_schedule(steps, 0) == (0, 6)  # (offset, steps after)
    assert run_schedule(steps, 1) == (4, 2)
    assert run_schedule(steps, 2) == (8, 0)
    assert run_schedule(steps, 1, steps_done=3) == (3, 2)  # the carried optimizer's count wins over the estimate
    assert run_schedule(steps, 5) == (10, 0)  # past the planned rounds: every planned step came before
    # K = 8, m = 4, N = 20 queries: rounds of 8, 8, 4 queries -> 32, 32, 16 samples, batch 8
    config = RunConfig(run_id="r", iterations=3, queries_per_iteration=8, responses_per_query=4, total_queries=20)
    settings = TrainerSettings(batch_size=8, epochs=2)
    assert run_steps_estimate(config, settings, "grace_kto") == [8, 8, 4]
    assert run_steps_estimate(config, settings, "dpo") == [2, 2, 2]  # one pair per query: ceil(8/8), ceil(4/8), x2 epochs
    # the iterations' pieces, each sized by run_schedule, are one cosine over the run
    peak, floor = 5e-6, 1e-6
    whole = [cosine_lr(k, sum(steps), peak, floor, 0.1) for k in range(sum(steps))]
    pieces = []
    for i, n in enumerate(steps):
        offset, later = run_schedule(steps, i)
        pieces += [cosine_lr(offset + k, offset + n + later, peak, floor, 0.1) for k in range(n)]
    assert pieces == whole and whole[-1] == pytest.approx(floor)


# --------------------------------------------------------------------------- GRPO


def test_group_advantages_are_z_with_unparsed_below_the_group():
    groups = ["a", "a", "a", "b", "b", "c"]
    zs = [1.2, -1.2, None, None, None, 0.0]
    # a: z as is, the unparsed one at min z - 1; b: no parsed response -> -1; c: an all-tied group stays 0
    assert losses.group_advantages(groups, zs) == pytest.approx([1.2, -1.2, -2.2, -1.0, -1.0, 0.0])


def test_grpo_loss_hand_computed():
    old = torch.zeros(4, dtype=torch.float64)
    logps = torch.log(torch.tensor([1.5, 0.5, 1.1, 0.9], dtype=torch.float64)).requires_grad_()
    advantages = torch.tensor([1.0, -1.0, 2.0, -0.5], dtype=torch.float64)
    # ratios 1.5 (A>0: clipped at 1.2), 0.5 (A<0: clipped at 0.8), 1.1 and 0.9 inside the clip range
    # terms: -1.2, +0.8, -2.2, +0.45 -> token mean -2.15 / 4
    loss = losses.grpo_loss(logps, old, advantages, epsilon=0.2)
    assert float(loss) == pytest.approx(-2.15 / 4, abs=1e-12)
    loss.backward()
    # clipped tokens give no gradient; the others -A * r / tokens
    assert logps.grad.tolist() == pytest.approx([0.0, 0.0, -2.2 / 4, 0.45 / 4], abs=1e-12)
    # k3 KL: ref - logp = log 2 -> 2 - log 2 - 1 on that token, beta 0.1, over 4 tokens; the rest are 0
    ref = logps.detach().clone()
    ref[0] += math.log(2.0)
    with_kl = losses.grpo_loss(logps, old, advantages, ref, epsilon=0.2, beta_kl=0.1)
    assert float(with_kl) == pytest.approx(-2.15 / 4 + 0.1 * (1 - math.log(2.0)) / 4, abs=1e-12)
    # a micro-batch's share: sum over its tokens / the batch's token count
    half = losses.grpo_loss(logps[:2], old[:2], advantages[:2], num_tokens=4)
    assert float(half) == pytest.approx((-1.2 + 0.8) / 4, abs=1e-12)
    # at the sampling policy (ratio 1, no KL), the loss is minus the token-weighted advantage
    assert float(losses.grpo_loss(old, old, advantages)) == pytest.approx(-float(advantages.mean()))


def _trl_grpo_loss(per_token_logps, inputs, loss_type: str, beta: float, epsilon: float) -> torch.Tensor:
    """TRL's own ``GRPOTrainer._compute_loss`` on per-token log-probs the test gives it."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    identity = lambda x, **_: x  # noqa: E731
    fake = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (per_token_logps, torch.zeros_like(per_token_logps), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        loss_type=loss_type, epsilon_low=epsilon, epsilon_high=epsilon, use_vllm=False,
        vllm_importance_sampling_correction=False, model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        args=types.SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
        accelerator=types.SimpleNamespace(num_processes=1, gather=identity, gather_for_metrics=identity, reduce=identity),
    )  # fmt: skip
    return GRPOTrainer._compute_loss(fake, None, inputs)


@pytest.mark.parametrize("loss_type", ["bnpo", "dapo", "grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_equals_trl_grpo(loss_type, beta):
    generator = torch.Generator().manual_seed(3)
    lengths = [5, 2, 4, 1]
    batch, width = len(lengths), max(lengths)
    mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths])
    old = -torch.rand(batch, width, generator=generator, dtype=torch.float64) * 3
    ref = -torch.rand(batch, width, generator=generator, dtype=torch.float64) * 3
    # ratios spread across both clip bounds
    offsets = torch.linspace(-0.6, 0.6, batch * width, dtype=torch.float64)[torch.randperm(batch * width, generator=generator)]
    current = old + offsets.reshape(batch, width)
    advantages = torch.tensor([1.3, -0.7, 0.4, -1.1], dtype=torch.float64)
    inputs = {
        "prompt_ids": torch.zeros(batch, 2, dtype=torch.long), "prompt_mask": torch.ones(batch, 2, dtype=torch.long),
        "completion_ids": torch.zeros(batch, width, dtype=torch.long), "completion_mask": mask,
        "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum().to(torch.float64),
    }  # fmt: skip
    trl_logps = current.clone().requires_grad_()
    trl_loss = _trl_grpo_loss(trl_logps, inputs, loss_type, beta, 0.2)
    trl_loss.backward()

    # ours on the flat response tokens, as the trainer passes them (advantage broadcast per token)
    keep = mask.bool()
    ours_logps = current.clone().requires_grad_()
    token_advantages = advantages[:, None].expand(batch, width)[keep]
    args = (ours_logps[keep], old[keep], token_advantages, ref[keep])
    if loss_type == "grpo":  # TRL's per-sequence mean: checks the per-token terms alone
        terms = losses.grpo_token_losses(*args, epsilon=0.2, beta_kl=beta)
        rows = torch.arange(batch)[:, None].expand(batch, width)[keep]
        per_seq = torch.zeros(batch, dtype=torch.float64).index_add(0, rows, terms) / mask.sum(-1)
        ours = per_seq.mean()
    else:
        ours = losses.grpo_loss(*args, epsilon=0.2, beta_kl=beta)
    ours.backward()
    ratio, signs = torch.exp(current - old)[keep], token_advantages.sign()
    assert bool(((ratio > 1.2) & (signs > 0)).any()) and bool(((ratio < 0.8) & (signs < 0)).any()), "both clips bind"
    assert float(ours) == pytest.approx(float(trl_loss), rel=1e-9, abs=1e-12)
    assert torch.allclose(ours_logps.grad, trl_logps.grad, rtol=1e-9, atol=1e-12)
    assert trl_logps.grad.abs().sum() > 0
