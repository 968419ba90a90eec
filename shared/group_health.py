"""Group health: is a batch of scored groups still giving a ranking signal?

Group-relative methods (GRACE's Z, GRPO's advantages) learn nothing from a
group whose responses all tie: every member gets Z = 0. This module measures,
for one batch of groups (an iteration, or one API call), the share of such
zero-variance groups, the parse and truncation rates, and each metric's mean
and spread. One pure function, used by the reward service's /metrics and by
each iteration's record, so both report the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from shared.schemas import FINISH_TRUNCATED, METRIC_SYMBOLS


@dataclass(frozen=True)
class Outcome:
    """What calibration said about one response: enough to judge its group's health."""

    parsed: bool
    z: float | None
    finish_reason: str | None = None  # None = unknown (not counted in the truncation rate)
    metrics: Mapping[str, float] | None = None  # Metrics field names -> values; None when unparsed

    @classmethod
    def from_row(cls, row: Mapping) -> "Outcome":
        """From a samples-file line or a dumped ``WeightedSample`` / ``ResponseResult``."""
        return cls(bool(row["parsed"]), row.get("z"), row.get("finish_reason"), row.get("metrics"))


@dataclass(frozen=True)
class GroupHealth:
    groups: int
    responses: int
    zero_variance_groups: int
    zero_variance_share: float | None  # None: no groups
    parse_rate: float | None  # None: no responses
    truncation_rate: float | None  # over responses whose finish_reason is known; None: none known
    metric_mean: dict[str, float] = field(default_factory=dict)  # symbol (L, E, ...) -> mean over parsed responses
    metric_std: dict[str, float] = field(default_factory=dict)  # symbol -> population std over parsed responses

    def flat(self) -> dict[str, float | int | None]:
        """One level of scalars (``L_mean``, ``L_std``, ...), as a metrics row or a tracker wants them."""
        row: dict[str, float | int | None] = {
            "zero_variance_share": self.zero_variance_share,
            "parse_rate": self.parse_rate,
            "truncation_rate": self.truncation_rate,
        }
        for symbol in self.metric_mean:
            row[f"{symbol}_mean"] = self.metric_mean[symbol]
            row[f"{symbol}_std"] = self.metric_std[symbol]
        return row


def is_zero_variance(group: Sequence[Outcome]) -> bool:
    """No ranking signal: fewer than two parsed responses, or every parsed Z is 0 (all rank sums tied).

    The same groups calibration calls degenerate (eq. 7 with std 0), so a group of unparsed responses
    counts too: whatever their weights, nothing in it is ranked.
    """
    zs = [o.z for o in group if o.parsed]
    return len(zs) < 2 or all(z == 0 for z in zs)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = math.fsum(values) / len(values)
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))


def group_health(groups: Sequence[Sequence[Outcome]]) -> GroupHealth:
    """Health of one batch of scored groups; metrics keyed by the paper's symbols (``METRIC_SYMBOLS``)."""
    outcomes = [o for group in groups for o in group]
    parsed = [o for o in outcomes if o.parsed and o.metrics is not None]
    known = [o for o in outcomes if o.finish_reason is not None]
    zero = sum(is_zero_variance(group) for group in groups)
    means: dict[str, float] = {}
    stds: dict[str, float] = {}
    if parsed:
        for symbol, name in METRIC_SYMBOLS.items():
            means[symbol], stds[symbol] = _mean_std([float(o.metrics[name]) for o in parsed])
    return GroupHealth(
        groups=len(groups),
        responses=len(outcomes),
        zero_variance_groups=zero,
        zero_variance_share=zero / len(groups) if groups else None,
        parse_rate=sum(o.parsed for o in outcomes) / len(outcomes) if outcomes else None,
        truncation_rate=sum(o.finish_reason == FINISH_TRUNCATED for o in known) / len(known) if known else None,
        metric_mean=means,
        metric_std=stds,
    )
