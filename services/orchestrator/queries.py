"""Pure parts of the iteration producer: accepting generated queries, ids, seeds.

Paper 3.2: new queries are kept only if they were not seen before in the run
(``normalize_query`` key); the examples come from ``shared.queries``.
A query equal to a held-out one (same key) is never a training query.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from shared.parsing import normalize_query
from shared.queries import SeedQuery
from shared.schemas import QuerySource


@dataclass(frozen=True)
class PlannedQuery:
    """One query of an iteration and where it came from."""

    query: str
    source: QuerySource = "generated"


def accept_queries(candidates: list[str], seen: set[str], *, limit: int, min_chars: int = 8, max_chars: int = 4000) -> list[str]:
    """New candidates, in order, at most ``limit``; adds their keys to ``seen``."""
    accepted = []
    for candidate in candidates:
        if len(accepted) >= limit:
            break
        text = candidate.strip()
        key = normalize_query(text)
        if not (min_chars <= len(text) <= max_chars) or key in seen:
            continue
        seen.add(key)
        accepted.append(text)
    return accepted


def drop_heldout(candidates: list[str], heldout: set[str]) -> tuple[list[str], list[str]]:
    """(kept, dropped): candidates whose normalized text is a held-out query are dropped."""
    kept, dropped = [], []
    for candidate in candidates:
        (dropped if normalize_query(candidate) in heldout else kept).append(candidate)
    return kept, dropped


def fallback_queries(seeds: list[SeedQuery], seen: set[str], needed: int, rng: random.Random) -> list[str]:
    """Up to ``needed`` seed queries not used before in the run (``seen`` holds the held-out keys too), in random order."""
    unused = [s.query for s in seeds if normalize_query(s.query) not in seen]
    rng.shuffle(unused)
    picked = unused[:needed]
    seen.update(normalize_query(q) for q in picked)
    return picked


def group_id(run_id: str, iteration: int, index: int) -> str:
    return f"{run_id}:{iteration}:{index}"


def group_seed(base: int | None, iteration: int, index: int) -> int | None:
    """A distinct, reproducible seed per group (vLLM adds the choice index for each of the n samples)."""
    if base is None:
        return None
    return (base + 1_000_003 * iteration + 1009 * index) % (2**31)
