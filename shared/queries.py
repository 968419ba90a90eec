"""Seed queries and the examples of the 3.2 query-generation prompt.

Used by the orchestrator (it generates each iteration's queries) and by the
trainer's SFT stage (it teaches a tiny policy the generation turn). Paper 3.2:
five seed queries sampled uniformly per prompt; the prompt's language follows
the examples.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from shared.jsonl import read_queries


@dataclass(frozen=True)
class SeedQuery:
    query: str
    lang: str = "en"
    id: str | None = None


def load_queries(path: str | Path) -> list[SeedQuery]:
    """A JSONL query file ({"query", "lang", "id", ...} per line)."""
    return [SeedQuery(query=row["query"], lang=row["lang"], id=row["id"]) for row in read_queries(path)]


def sample_examples(seeds: list[SeedQuery], rng: random.Random, count: int = 5) -> list[SeedQuery]:
    """``count`` distinct seeds, uniformly (with repeats only if the seed set is smaller)."""
    if not seeds:
        raise ValueError("the seed query set is empty")
    if len(seeds) >= count:
        return rng.sample(seeds, count)
    return [rng.choice(seeds) for _ in range(count)]


def prompt_lang(examples: list[SeedQuery], setting: str = "auto") -> str:
    """The generation prompt's language: fixed, or the most common among the examples (ties -> zh, the paper's)."""
    if setting != "auto":
        return setting
    counts = Counter(e.lang if e.lang in ("en", "zh") else "en" for e in examples)
    return "zh" if counts["zh"] >= counts["en"] else "en"
