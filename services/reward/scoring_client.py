"""`grace score`: metrics through the HTTP API or in-process, calibration over the whole file."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx

from services.reward.scorer import score_response
from shared.jsonl import read_jsonl
from shared.schemas import Metrics, ScoreGroup, ScoreResponse


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


def metrics_via_api(
    client: httpx.Client, groups: list[ScoreGroup], headers: dict[str, str], attempts: int = 30
) -> list[list[Metrics | None]]:
    body = {"groups": [g.model_dump() for g in groups]}
    for _ in range(attempts):
        reply = client.post("/v1/score", json=body, headers=headers)
        if reply.status_code == 503:  # busy or loading: wait as told
            time.sleep(float(reply.headers.get("Retry-After", "2")))
            continue
        if reply.status_code != 200:
            raise RuntimeError(f"/v1/score answered {reply.status_code}: {reply.text[:500]}")
        parsed = ScoreResponse.model_validate(reply.json())
        return [[r.metrics if r.parsed else None for r in g.results] for g in parsed.groups]
    raise RuntimeError(f"/v1/score still busy after {attempts} attempts")


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
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        with httpx.Client(base_url=url, timeout=httpx.Timeout(600.0, connect=10.0)) as client:
            for chunk in chunks:
                metrics += metrics_via_api(client, chunk, headers)
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
