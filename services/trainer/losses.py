"""Alignment losses as small pure functions of sequence log-probabilities.

Every input is a 1-D tensor with one entry per sequence: the log-probability
of the response given the prompt, summed over the response tokens. Nothing
here touches a model, so the math is testable alone (and against TRL).

GRACE-KTO (paper 3.5, eq. 10-12)::

    L = E[ |W| * lambda(W) * (1 - sigmoid(beta * y(W) * (log pi/pi_ref - z_ref))) ]

with y(W) = +1 for W >= 0 else -1, lambda(W) = lambda+ for W >= 0 else
lambda-, and z_ref the detached, clamped KL estimate from mismatched pairs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

# --------------------------------------------------------------------------- GRACE-KTO


def grace_kto_losses(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    weights: torch.Tensor,
    z_ref: torch.Tensor,
    beta: float,
    lambda_desirable: float,
    lambda_undesirable: float,
) -> torch.Tensor:
    """Per-sequence GRACE-KTO terms (eq. 11), before the batch mean."""
    weights = weights.to(policy_logps.dtype)
    desirable = weights >= 0  # eq. 10: W = 0 counts as desirable (and then weighs nothing)
    sign = torch.where(desirable, 1.0, -1.0).to(policy_logps.dtype)
    lam = torch.where(desirable, lambda_desirable, lambda_undesirable).to(policy_logps.dtype)
    delta_r = (policy_logps - reference_logps) - z_ref  # eq. 12
    return weights.abs() * lam * (1.0 - torch.sigmoid(beta * sign * delta_r))


def grace_kto_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    weights: torch.Tensor,
    z_ref: torch.Tensor,
    beta: float,
    lambda_desirable: float,
    lambda_undesirable: float,
    num_sequences: float | None = None,
) -> torch.Tensor:
    """The batch mean of eq. 11: |W| * lambda(W) * (1 - sigmoid(beta * y(W) * ((pi - pi_ref) - z_ref))).

    ``num_sequences``: the batch's size when these are a micro-batch of it (the sum is divided by it)."""
    terms = grace_kto_losses(policy_logps, reference_logps, weights, z_ref, beta, lambda_desirable, lambda_undesirable)
    return terms.sum() / (num_sequences if num_sequences is not None else max(terms.numel(), 1))


def kl_reference_point(policy_kl_logps: torch.Tensor, reference_kl_logps: torch.Tensor) -> torch.Tensor:
    """z_ref (eq. 12) as KTO estimates it: mean log-ratio of mismatched (x, y') pairs.

    Detached (no gradient flows through the reference point), averaged over
    all processes when torch.distributed is initialized, then clamped at 0.
    """
    kl = (policy_kl_logps - reference_kl_logps).detach().mean()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(kl, op=dist.ReduceOp.SUM)
        kl = kl / dist.get_world_size()
    return kl.clamp(min=0)


def class_weights(
    num_desirable: int,
    num_undesirable: int,
    mode: str = "balanced",
    fixed: tuple[float, float] = (1.0, 1.0),
) -> tuple[float, float]:
    """(lambda+, lambda-) for the iteration.

    ``balanced``: lambda+ |Omega+| = lambda- |Omega-| (paper 3.5), the larger
    class keeps weight 1 and the smaller one is scaled up (KTO's convention);
    ``fixed``: the given pair. An empty class leaves both at their fixed value.
    """
    if mode == "fixed" or num_desirable == 0 or num_undesirable == 0:
        return float(fixed[0]), float(fixed[1])
    if mode != "balanced":
        raise ValueError(f"unknown lambda mode {mode!r}; choose balanced or fixed")
    if num_desirable >= num_undesirable:
        return 1.0, num_desirable / num_undesirable
    return num_undesirable / num_desirable, 1.0


def reward_stats(
    policy_logps: torch.Tensor, reference_logps: torch.Tensor, weights: torch.Tensor, beta: float
) -> dict[str, float]:
    """Implicit rewards beta * log(pi/pi_ref) of desirable and undesirable samples, and their margin."""
    rewards = beta * (policy_logps - reference_logps).detach().float()
    desirable = weights >= 0
    out: dict[str, float] = {}
    if desirable.any():
        out["rewards_chosen"] = float(rewards[desirable].mean())
    if (~desirable).any():
        out["rewards_rejected"] = float(rewards[~desirable].mean())
    if "rewards_chosen" in out and "rewards_rejected" in out:
        out["reward_margin"] = out["rewards_chosen"] - out["rewards_rejected"]
    return out


# --------------------------------------------------------------------------- baselines


def kto_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    desirable: torch.Tensor,
    z_ref: torch.Tensor,
    beta: float,
    lambda_desirable: float = 1.0,
    lambda_undesirable: float = 1.0,
    num_sequences: float | None = None,
) -> torch.Tensor:
    """Binary KTO (Ethayarajh et al. 2024, eq. 7-8): GRACE-KTO with |W| = 1 (sign only)."""
    weights = torch.where(desirable.bool(), 1.0, -1.0).to(policy_logps.device)
    return grace_kto_loss(
        policy_logps, reference_logps, weights, z_ref, beta, lambda_desirable, lambda_undesirable, num_sequences
    )


def sft_loss(logps: torch.Tensor, token_counts: torch.Tensor | None = None, *, num_tokens: float | None = None) -> torch.Tensor:
    """Token-mean negative log-likelihood of the given sequences (0 for none): summed log-probs over
    ``token_counts.sum()``, or over ``num_tokens`` (the whole batch's, when these are a micro-batch of it)."""
    tokens = float(num_tokens) if num_tokens is not None else float(token_counts.sum()) if token_counts is not None else 0.0
    if logps.numel() == 0 or tokens <= 0:
        return logps.sum() * 0.0
    return -logps.sum() / tokens


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """DPO (Rafailov et al. 2023): -log sigmoid(beta * (chosen log-ratio - rejected log-ratio)), batch mean."""
    logits = (chosen_logps - reference_chosen_logps) - (rejected_logps - reference_rejected_logps)
    return -F.logsigmoid(beta * logits).mean()


def orpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    alpha: float,
) -> torch.Tensor:
    """ORPO (Hong et al. 2024): NLL(chosen) - alpha * log sigmoid(log odds ratio), batch mean.

    Odds use the length-normalized (per-token mean) log-probabilities, as in the paper.
    """
    chosen_mean = chosen_logps / chosen_tokens.clamp(min=1)
    rejected_mean = rejected_logps / rejected_tokens.clamp(min=1)
    # log odds(p) = log p - log(1 - p), computed stably from log p < 0
    log_odds = (chosen_mean - rejected_mean) - (
        torch.log1p(-torch.exp(chosen_mean).clamp(max=1 - 1e-6)) - torch.log1p(-torch.exp(rejected_mean).clamp(max=1 - 1e-6))
    )
    nll = -chosen_mean
    return (nll - alpha * F.logsigmoid(log_odds)).mean()


def best_worst_pairs(group_ids: list[str], weights: list[float]) -> list[tuple[int, int]]:
    """(best, worst) sample indices per group by W, for the pairwise baselines.

    Groups whose best and worst weights are equal (or with one sample) give no pair.
    Pairs come in order of each group's first appearance.
    """
    groups: dict[str, list[int]] = {}
    for index, group in enumerate(group_ids):
        groups.setdefault(group, []).append(index)
    pairs = []
    for members in groups.values():
        best = max(members, key=lambda i: (weights[i], -i))
        worst = min(members, key=lambda i: (weights[i], i))
        if weights[best] > weights[worst]:
            pairs.append((best, worst))
    return pairs


# --------------------------------------------------------------------------- GRPO (online RL baseline)


def group_advantages(group_ids: list[str], zs: list[float | None]) -> list[float]:
    """GRPO's group-relative advantages from the same rewards GRACE-KTO uses.

    A parsed response's advantage is its group's rank-sum z-score (eq. 6-7): already
    centred on the group mean and scaled by the group's population std, with an
    all-tied group at 0 (TRL's ``(r - mean) / std`` of the group, with the
    population std). An unparsed response (``z`` None) ranks below every parsed
    response of its group: advantage = the group's minimum z minus 1, or -1 when no
    response of the group parsed (GRACE-KTO's unparsed weight).
    """
    floor: dict[str, float] = {}
    for group, z in zip(group_ids, zs):
        if z is not None:
            floor[group] = min(floor.get(group, z), z)
    return [float(z) if z is not None else floor.get(group, 0.0) - 1.0 for group, z in zip(group_ids, zs)]


def grpo_token_losses(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    ref_logps: torch.Tensor | None = None,
    epsilon: float = 0.2,
    beta_kl: float = 0.0,
) -> torch.Tensor:
    """Per-token GRPO terms (Shao et al. 2024; TRL's GRPOTrainer, token-level ratio):

        -min(r * A, clip(r, 1 - eps, 1 + eps) * A) + beta_kl * (exp(ref - logp) - (ref - logp) - 1)

    with r = exp(logp - old_logp) the ratio to the sampling policy. All inputs share
    one shape (tokens, or sequences x tokens); ``advantages`` is each token's
    sequence advantage. ``old_logps`` and ``ref_logps`` are treated as constants.
    """
    ratio = torch.exp(logps - old_logps.detach())
    clipped = ratio.clamp(1.0 - epsilon, 1.0 + epsilon)
    advantages = advantages.to(logps.dtype)
    terms = -torch.min(ratio * advantages, clipped * advantages)
    if beta_kl != 0.0:
        if ref_logps is None:
            raise ValueError("beta_kl > 0 needs the reference log-probs")
        delta = ref_logps.detach() - logps
        terms = terms + beta_kl * (torch.exp(delta) - delta - 1.0)  # k3 estimator of KL(pi || pi_ref)
    return terms


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    ref_logps: torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    num_tokens: float | int | None = None,
    epsilon: float = 0.2,
    beta_kl: float = 0.0,
) -> torch.Tensor:
    """GRPO with no critic, averaged over the tokens of the whole batch: TRL's ``loss_type="bnpo"``
    (= its default ``"dapo"`` on one process without gradient accumulation), so a long response
    weighs by its token count, not 1/|o| per sequence as in the original ``"grpo"`` mean.

    ``mask``: 1 on real tokens (padded inputs); ``num_tokens``: the batch's token count when this
    call sees only one micro-batch of it (the default is the tokens given here).
    """
    terms = grpo_token_losses(logps, old_logps, advantages, ref_logps, epsilon, beta_kl)
    if mask is not None:
        terms = terms * mask.to(terms.dtype)
        count = mask.sum()
    else:
        count = torch.tensor(float(terms.numel()))
    denominator = float(num_tokens) if num_tokens is not None else max(float(count), 1.0)
    return terms.sum() / denominator
