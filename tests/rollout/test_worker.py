"""The rollout worker against the real service: well-formed groups, idempotent restart, dedupe, offline mode."""

import asyncio
import json
import time

import pytest

from shared.parsing import normalize_query
from shared.schemas import STREAM_ROLLOUTS, IterationComplete, RolloutGroup, decode_message
from shared.streams import IterationManifest
from services.rollout.config import RolloutSettings
from services.rollout.worker import load_queries, run_iteration


def _settings(rollout_service, run_id, **extra):
    values = dict(
        run_id=run_id, gateway_url=rollout_service.base_url, api_key=rollout_service.api_key, redis_url=rollout_service.redis_url,
        max_tokens=24, generation_max_tokens=160, generation_attempts=4, max_query_chars=200, concurrency=8, seed=7,
    )  # fmt: skip
    values.update(extra)
    return RolloutSettings(**values)


def _entries(client, run_id):
    payloads = [decode_message(fields) for _, fields in client.xrange(STREAM_ROLLOUTS)]
    return [p for p in payloads if p.run_id == run_id]


@pytest.fixture
def run_id():
    return f"worker-{time.time_ns()}"


def test_iteration_publishes_well_formed_groups_then_completes(rollout_service, redis_client, run_id):
    settings = _settings(rollout_service, run_id, generation_json_list=True, max_query_chars=60, generation_max_tokens=400)
    result = asyncio.run(run_iteration(settings, redis_client, 0, k=3, m=2))
    entries = _entries(redis_client, run_id)
    groups = [e for e in entries if isinstance(e, RolloutGroup)]
    assert result.published == 3 and len(groups) == 3
    assert isinstance(entries[-1], IterationComplete) and entries[-1].count == 3 and entries[-1].stage == "rollout"
    assert sorted(g.group_id for g in groups) == [f"{run_id}:0:{i}" for i in range(3)]
    version = rollout_service.admin()["current"]["version"]
    seeds = {normalize_query(q.query) for q in load_queries(settings.seed_queries)}
    for group in groups:
        assert group.iteration == 0 and len(group.responses) == 2 and group.adapter_version == version
        assert group.query.strip()
        if group.query_source == "generated":
            assert normalize_query(group.query) not in seeds
    assert len({normalize_query(g.query) for g in groups}) == 3
    assert result.generated > 0  # the JSON-list constraint makes even the tiny model produce parseable lists
    assert IterationManifest(redis_client, run_id).expected("rollout", 0) == 3

    # a restart of the same iteration publishes nothing again
    again = asyncio.run(run_iteration(settings, redis_client, 0, k=3, m=2))
    assert again.published == 0 and again.skipped == 3
    assert len(_entries(redis_client, run_id)) == len(entries)

    # the next iteration never repeats a query of the run
    asyncio.run(run_iteration(settings, redis_client, 1, k=3, m=2))
    later = [e for e in _entries(redis_client, run_id) if isinstance(e, RolloutGroup) and e.iteration == 1]
    assert len(later) == 3
    assert not {normalize_query(g.query) for g in later} & {normalize_query(g.query) for g in groups}


def test_junk_generator_falls_back_to_unused_seed_queries(rollout_service, redis_client, run_id):
    settings = _settings(rollout_service, run_id, generation_attempts=1, generation_max_tokens=8)
    result = asyncio.run(run_iteration(settings, redis_client, 0, k=4, m=2))
    groups = [e for e in _entries(redis_client, run_id) if isinstance(e, RolloutGroup)]
    assert result.published == 4 and result.fallback >= 1
    seeds = {normalize_query(q.query) for q in load_queries(settings.seed_queries)}
    fallback = [g for g in groups if g.query_source == "seed_fallback"]
    assert len(fallback) == result.fallback and all(normalize_query(g.query) in seeds for g in fallback)


def test_offline_mode_samples_the_fixed_set(rollout_service, redis_client, run_id):
    settings = _settings(rollout_service, run_id, max_tokens=8)
    fixed = load_queries(settings.offline_queries)
    result = asyncio.run(run_iteration(settings, redis_client, 0, m=2, offline=True))
    groups = [e for e in _entries(redis_client, run_id) if isinstance(e, RolloutGroup)]
    assert result.planned == len(fixed) == len(groups)
    assert {g.query for g in groups} == {q.query for q in fixed} and {g.query_source for g in groups} == {"fixed"}
    plan = json.loads(redis_client.get(f"grace:rollout:{run_id}:plan:0"))
    assert len(plan) == len(fixed)
