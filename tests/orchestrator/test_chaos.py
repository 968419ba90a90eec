"""`grace bench chaos` (issue #14.5): the seeded fault schedule and the accounting as pure logic, then one
real chaos run on a tiny stack of its own (1 iteration, K=2, m=2: every fault kind lands in it)."""

from __future__ import annotations

import pytest

from services.orchestrator.chaos import FAULT_KINDS, ChaosOptions, Fault, account, due_faults, fault_schedule, run_chaos


def test_schedule_injects_every_kind_at_least_once_even_in_one_iteration():
    faults = fault_schedule(1, seed=0)
    assert sorted(f.kind for f in faults) == sorted(FAULT_KINDS)
    assert {f.iteration for f in faults} == {0}
    assert all(0.05 <= f.at <= 0.95 for f in faults)
    assert [f.at for f in faults] == sorted(f.at for f in faults)


def test_schedule_is_seeded_and_spreads_faults_over_iterations():
    assert fault_schedule(3, seed=7) == fault_schedule(3, seed=7)
    assert fault_schedule(3, seed=7) != fault_schedule(3, seed=8)
    faults = fault_schedule(3, seed=7, per_kind=2)
    assert {f.iteration for f in faults} == {0, 1, 2}
    assert all(sum(f.kind == kind for f in faults) == 2 for kind in FAULT_KINDS)


@pytest.mark.parametrize("kwargs, message", [
    ({"iterations": 0}, "iterations must be >= 1"),
    ({"iterations": 1, "kinds": ("judge",)}, "unknown fault kind"),
    ({"iterations": 1, "per_kind": 0}, "at least once"),
])  # fmt: skip
def test_schedule_refuses_what_it_cannot_do(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fault_schedule(seed=0, **kwargs)


def test_due_faults_are_those_of_this_iteration_whose_point_has_passed():
    faults = [Fault("redis", 0, 0.2), Fault("trainer", 0, 0.8), Fault("reward", 1, 0.1)]
    assert due_faults(faults, 0, elapsed_s=5.0, window_s=10.0) == [Fault("redis", 0, 0.2)]
    assert due_faults(faults, 0, elapsed_s=9.0, window_s=10.0) == faults[:2]
    assert due_faults(faults, 1, elapsed_s=0.5, window_s=10.0) == []


def test_account_counts_lost_and_duplicated_samples():
    published = {0: {"a", "b", "c"}, 1: {"d"}}
    assert account(published, {0: ["a", "b", "c"], 1: ["d"]}) == {
        "samples_published": 4, "samples_trained": 4, "lost": 0, "duplicated": 0,
    }  # fmt: skip
    assert account(published, {0: ["a", "b", "b"], 1: []}) == {
        "samples_published": 4, "samples_trained": 3, "lost": 2, "duplicated": 1,
    }  # fmt: skip


def test_chaos_run_kills_every_kind_and_loses_or_duplicates_nothing(tmp_path, tiny_models):
    result = run_chaos(ChaosOptions(out_dir=tmp_path, iterations=1, queries=2, responses=2))
    assert result["faults_injected"] == {kind: 1 for kind in FAULT_KINDS}
    assert result["iterations_completed"] == result["iterations_planned"] == 1
    assert result["samples_published"] == result["samples_trained"] == 2 * 2
    assert result["lost"] == 0 and result["duplicated"] == 0
    assert result["slowdown"] > 0
    assert {"rollout", "reward", "trainer", "redis"} <= set(result["restarts"])
