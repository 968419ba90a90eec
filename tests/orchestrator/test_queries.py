"""Pure parts of the rollout worker (paper 3.2)."""

import random

import pytest

from services.orchestrator.queries import (
    accept_queries,
    drop_heldout,
    fallback_queries,
    group_id,
    group_seed,
)
from shared.parsing import normalize_query
from shared.queries import SeedQuery, prompt_lang, sample_examples

SEEDS = [SeedQuery(f"Write a report on topic {i}", "en" if i % 2 else "zh", f"s{i}") for i in range(10)]


def test_five_distinct_examples_uniformly():
    rng = random.Random(0)
    counts = {s.id: 0 for s in SEEDS}
    for _ in range(2000):
        picked = sample_examples(SEEDS, rng, 5)
        assert len({p.id for p in picked}) == 5
        for p in picked:
            counts[p.id] += 1
    assert min(counts.values()) > 0.8 * 1000 and max(counts.values()) < 1.2 * 1000  # each seed: 5/10 of draws


def test_small_seed_sets_and_empty():
    assert len(sample_examples(SEEDS[:2], random.Random(0), 5)) == 5
    with pytest.raises(ValueError):
        sample_examples([], random.Random(0))


def test_prompt_language():
    assert prompt_lang([SeedQuery("a", "en")] * 3 + [SeedQuery("b", "zh")] * 2) == "en"
    assert prompt_lang([SeedQuery("a", "zh")] * 3 + [SeedQuery("b", "en")] * 2) == "zh"
    assert prompt_lang([SeedQuery("a", "zh")] * 5, "en") == "en"


def test_accept_drops_seen_duplicates_and_bad_lengths():
    seen = {normalize_query("An  OLD query about energy")}
    candidates = ["an old query about energy", "New query on bonds", "new   query on BONDS", "short", "x" * 50, "Third one here"]
    accepted = accept_queries(candidates, seen, limit=2, min_chars=8, max_chars=40)
    assert accepted == ["New query on bonds", "Third one here"]
    assert normalize_query("Third one here") in seen


def test_fallback_takes_only_unused_seeds():
    seen = {normalize_query(s.query) for s in SEEDS[:7]}
    picked = fallback_queries(SEEDS, seen, 5, random.Random(1))
    assert sorted(picked) == sorted(s.query for s in SEEDS[7:])
    assert fallback_queries(SEEDS, seen, 5, random.Random(1)) == []  # all used now


def test_ids_and_seeds_are_deterministic_and_distinct():
    assert group_id("run", 2, 7) == "run:2:7"
    seeds = {group_seed(0, it, i) for it in range(3) for i in range(100)}
    assert len(seeds) == 300 and group_seed(None, 1, 1) is None
    assert group_seed(5, 1, 2) == group_seed(5, 1, 2)


def test_drop_heldout_drops_queries_equal_after_case_and_whitespace():
    heldout = {normalize_query("Write a Report on  Grid Storage")}
    kept, dropped = drop_heldout(
        ["write a report on grid storage ", "Write a report on solar", "WRITE A REPORT\non grid storage"], heldout
    )
    assert kept == ["Write a report on solar"]
    assert dropped == ["write a report on grid storage ", "WRITE A REPORT\non grid storage"]


def test_fallback_never_picks_a_key_already_in_seen():
    seeds = [SeedQuery(f"seed query {i}") for i in range(6)]
    seen = {normalize_query("seed query 1"), normalize_query("SEED query 4")}  # e.g. held-out keys
    picked = fallback_queries(seeds, seen, 10, random.Random(0))
    assert sorted(picked) == sorted(f"seed query {i}" for i in (0, 2, 3, 5))
