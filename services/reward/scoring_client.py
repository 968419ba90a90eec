"""`grace score`: metrics through the HTTP API (``RewardClient``) or in-process, calibration over the whole file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from services.reward.scorer import score_response
from shared.jsonl import read_jsonl
from shared.schemas import Metrics, ScoreGroup
from shared.service_client import RewardClient


def load_groups(path: Path) -> list[ScoreGroup]:
    groups = []
    for n, row in enumerate(read_jsonl(path), 1):
        try:
            groups.append(ScoreGroup(query=row["query"], responses=row["responses"]))
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{path}:{n}: need {{query: str, responses: [str, ...]}}: {exc}") from None
    if not groups:
        raise ValueError(f"{path}: no groups")
    return groups


def score_file(
    groups: list[ScoreGroup],
    out: Path,
    *,
    url: str | None = None,
    api_key: str | None = None,
    batch: int = 8,
    advance: Callable[[int], None] = lambda n: None,
) -> int:
    """Writes one line {query, results} per group to ``out``; returns the number of groups."""
    metrics: list[list[Metrics | None]] = []
    chunks = [groups[i : i + batch] for i in range(0, len(groups), batch)]
    if url:
        with RewardClient(url, api_key) as client:
            for chunk in chunks:
                scored = client.score(chunk)
                metrics += [[r.metrics if r.parsed else None for r in g.results] for g in scored.groups]
                advance(sum(len(g.responses) for g in chunk))
    else:
        from services.reward.config import RewardSettings
        from services.reward.scorer import Scorer

        scorer = Scorer(RewardSettings(worker=False))
        for chunk in chunks:
            metrics += scorer.score([(g.query, g.responses) for g in chunk])
            advance(sum(len(g.responses) for g in chunk))
    result = score_response([(g.query, m) for g, m in zip(groups, metrics)])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for group in result.groups:
            fh.write(group.model_dump_json() + "\n")
    tmp.replace(out)
    return len(result.groups)
