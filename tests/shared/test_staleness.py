"""Adapter staleness: iteration i is on-policy when sampled by iter-(i-1), iteration 0 by the base."""

from __future__ import annotations

from services.trainer.worker import split_stale
from shared.adapters import staleness
from shared.schemas import WeightedSample


def test_staleness_counts_versions_behind_the_on_policy_one():
    assert staleness("base", 0) == 0
    assert staleness("iter-0000", 1) == 0
    assert staleness("base", 1) == 1
    assert staleness("iter-0001", 4) == 2
    assert staleness("iter-0003", 2) == -2  # newer than expected: not stale
    assert staleness(None, 3) is None and staleness("my-policy", 3) is None  # unknown: not judged


def _sample(i: int, version: str | None) -> WeightedSample:
    return WeightedSample(run_id="r", iteration=3, sample_id=f"g:{i}", group_id="g", response_index=i, query="q",
                          response="a", weight=0.5, label="desirable", parsed=True, adapter_version=version)  # fmt: skip


def test_split_stale_keeps_what_the_limit_allows():
    samples = [_sample(0, "iter-0002"), _sample(1, "iter-0001"), _sample(2, "base"), _sample(3, None)]
    fresh, stale = split_stale(samples, 3, 0)
    assert [s.sample_id for s in fresh] == ["g:0", "g:3"] and [s.sample_id for s in stale] == ["g:1", "g:2"]
    fresh, stale = split_stale(samples, 3, 1)
    assert [s.sample_id for s in stale] == ["g:2"]  # base is 3 behind iter-0002
    assert split_stale(samples, 3, None) == (samples, [])
