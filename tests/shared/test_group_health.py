"""Group health (shared.group_health), checked against figures worked out by hand."""

from __future__ import annotations

import math

import pytest

from shared.group_health import Outcome, group_health, is_zero_variance
from shared.schemas import METRIC_SYMBOLS


def metrics(length: float, relevance: float = 0.5) -> dict[str, float]:
    values = dict.fromkeys(METRIC_SYMBOLS.values(), 1.0)
    values.update(length=length, relevance_document=relevance)
    return values


def parsed(z: float, length: float, finish: str | None = "stop", relevance: float = 0.5) -> Outcome:
    return Outcome(True, z, finish, metrics(length, relevance))


UNPARSED = Outcome(False, None, "length", None)


def test_zero_variance_means_no_ranking_signal():
    assert not is_zero_variance([parsed(1.0, 1), parsed(-1.0, 2)])
    assert is_zero_variance([parsed(0.0, 1), parsed(0.0, 2), parsed(0.0, 3)])  # all rank sums tied
    assert is_zero_variance([parsed(0.0, 1), UNPARSED])  # one parsed response: nothing to rank
    assert is_zero_variance([UNPARSED, UNPARSED])
    assert is_zero_variance([])
    assert not is_zero_variance([parsed(0.0, 1), parsed(1.2, 2), parsed(-1.2, 3), UNPARSED])


def test_health_of_a_batch_by_hand():
    groups = [
        [parsed(1.0, 10, relevance=0.2), parsed(-1.0, 30, "length", relevance=0.4)],  # ranked
        [parsed(0.0, 20), parsed(0.0, 20)],  # tied: zero variance
        [parsed(0.0, 40, None), UNPARSED],  # one parsed: zero variance; its finish reason unknown
    ]
    health = group_health(groups)
    assert health.groups == 3 and health.responses == 6
    assert health.zero_variance_groups == 2 and health.zero_variance_share == pytest.approx(2 / 3)
    assert health.parse_rate == pytest.approx(5 / 6)
    assert health.truncation_rate == pytest.approx(2 / 5)  # 'length' twice among the 5 known finish reasons
    # L over the 5 parsed responses: 10, 30, 20, 20, 40 -> mean 24, population variance (196+36+16+16+256)/5 = 104
    assert health.metric_mean["L"] == pytest.approx(24.0)
    assert health.metric_std["L"] == pytest.approx(math.sqrt(104))
    # Rd: 0.2, 0.4, 0.5, 0.5, 0.5 -> mean 0.42, variance (0.0484 + 0.0004 + 3 * 0.0064) / 5 = 0.0136
    assert health.metric_mean["Rd"] == pytest.approx(0.42)
    assert health.metric_std["Rd"] == pytest.approx(math.sqrt(0.0136))
    assert health.metric_mean["E"] == 1.0 and health.metric_std["E"] == 0.0
    assert set(health.metric_mean) == set(METRIC_SYMBOLS)
    flat = health.flat()
    assert flat["L_mean"] == pytest.approx(24.0) and flat["Rd_std"] == pytest.approx(math.sqrt(0.0136))
    assert flat["zero_variance_share"] == pytest.approx(2 / 3) and flat["parse_rate"] == pytest.approx(5 / 6)
    assert all(not isinstance(v, dict) for v in flat.values())  # one level: a tracker logs it as is


def test_empty_and_unknown_figures_are_none_not_zero():
    health = group_health([])
    assert health.zero_variance_share is None and health.parse_rate is None and health.truncation_rate is None
    assert health.metric_mean == {} and health.flat()["parse_rate"] is None
    nothing_parsed = group_health([[Outcome(False, None), Outcome(False, None)]])
    assert nothing_parsed.parse_rate == 0.0 and nothing_parsed.zero_variance_share == 1.0
    assert nothing_parsed.truncation_rate is None and nothing_parsed.metric_mean == {}


def test_rows_of_the_samples_file_and_of_the_api_read_the_same():
    row = {"parsed": True, "z": 0.5, "finish_reason": "length", "metrics": metrics(7), "weight": 1.0, "index": 0}
    assert Outcome.from_row(row) == Outcome(True, 0.5, "length", metrics(7))
    assert Outcome.from_row({"parsed": False, "metrics": None}) == Outcome(False, None, None, None)
