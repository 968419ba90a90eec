"""OpenRLHF's remote reward contract (``POST /get_reward``) over the group-calibrated reward.

OpenRLHF sends flat lists, one entry per sample: ``query[i]`` is the prompt
and the response as the policy saw them, ``prompts[i]`` the prompt alone.
Here the response is the query without its prompt, samples that share a
prompt within one call form a group, and the groups go through the same
scoring and calibration as ``/v1/score`` (the call is the dataset of eq. 8-9).
The answer maps back to the flat order. Pure: no models, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from shared.group_health import Outcome, is_zero_variance
from shared.schemas import METRIC_SYMBOLS, GetRewardResponse, ScoreResponse

UNPARSED_MARGIN = 1.0  # an unparsed sample's reward sits this far below the lowest Z of its group


@dataclass(frozen=True)
class PromptGroups:
    """The samples of one call grouped by prompt, groups in order of first appearance."""

    prompts: list[str]
    responses: list[list[str]]
    members: list[list[int]]  # per group, the sample indices of its responses, in order

    @property
    def samples(self) -> int:
        return sum(len(m) for m in self.members)


def prefix_mismatches(queries: Sequence[str], prompts: Sequence[str]) -> list[int]:
    """Indices whose query does not start with its prompt (so no response can be cut out of it)."""
    return [i for i, (query, prompt) in enumerate(zip(queries, prompts)) if not query.startswith(prompt)]


def group_by_prompt(queries: Sequence[str], prompts: Sequence[str]) -> PromptGroups:
    """Responses (query minus its prompt) grouped by identical prompt; every query must start with its prompt."""
    bad = prefix_mismatches(queries, prompts)
    if bad:
        raise ValueError(f"query {bad[0]} does not start with its prompt")
    index: dict[str, int] = {}
    groups = PromptGroups([], [], [])
    for i, (query, prompt) in enumerate(zip(queries, prompts)):
        g = index.setdefault(prompt, len(groups.prompts))
        if g == len(groups.prompts):
            groups.prompts.append(prompt)
            groups.responses.append([])
            groups.members.append([])
        groups.responses[g].append(query[len(prompt) :])
        groups.members[g].append(i)
    return groups


def unparsed_reward(parsed_zs: Sequence[float]) -> float:
    """Reward of an unparsed sample: ``UNPARSED_MARGIN`` below the group's lowest Z (Z has mean 0, so the
    lowest is <= 0; with no parsed sample, -1). An unparsed response then ranks below every parsed one, as
    its weight of -1 does in eq. 8-9, and a group of unparsed samples alone has zero variance."""
    return min(parsed_zs, default=0.0) - UNPARSED_MARGIN


def remote_reward(groups: PromptGroups, scored: ScoreResponse) -> GetRewardResponse:
    """Flat OpenRLHF answer from the calibrated groups: ``rewards`` = Z, ``scores`` = W, ``extra_logs`` per sample."""
    n = groups.samples
    rewards, scores = [0.0] * n, [0.0] * n
    logs: dict[str, list[float]] = {name: [0.0] * n for name in (*METRIC_SYMBOLS, "parsed", "rank_sum", "zero_variance_group")}
    for members, result in zip(groups.members, scored.groups):
        zs = [r.z for r in result.results if r.parsed and r.z is not None]
        floor = unparsed_reward(zs)
        flat = 1.0 if is_zero_variance([Outcome(r.parsed, r.z) for r in result.results]) else 0.0
        for i, r in zip(members, result.results):
            rewards[i] = r.z if r.parsed and r.z is not None else floor
            scores[i] = r.weight
            logs["parsed"][i] = 1.0 if r.parsed else 0.0
            logs["rank_sum"][i] = r.rank_sum if r.rank_sum is not None else 0.0
            logs["zero_variance_group"][i] = flat
            if r.metrics is not None:
                for symbol, name in METRIC_SYMBOLS.items():
                    logs[symbol][i] = getattr(r.metrics, name)
    return GetRewardResponse(rewards=rewards, scores=scores, extra_logs=logs)
