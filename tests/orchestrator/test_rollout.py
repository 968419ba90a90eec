"""The rollout worker against the real service: well-formed groups, idempotent restart, dedupe, offline mode."""

import asyncio
import json
import time

import httpx
import pytest

from services.orchestrator.rollout import RolloutWorker, run_iteration
from services.rollout.config import RolloutSettings
from shared.parsing import normalize_query
from shared.queries import load_queries
from shared.schemas import STREAM_ROLLOUTS, IterationComplete, RolloutGroup, decode_message


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
    seeds = {normalize_query(q.query) for q in load_queries(settings.seed_queries)}
    for group in groups:  # iteration 0 samples the starting policy, whatever adapter `policy` means now
        assert group.iteration == 0 and len(group.responses) == 2 and group.adapter_version == "base"
        assert group.query.strip()
        if group.query_source == "generated":
            assert normalize_query(group.query) not in seeds
    assert len({normalize_query(g.query) for g in groups}) == 3
    assert result.generated > 0  # the JSON-list constraint makes even the tiny model produce parseable lists

    # a restart of the same iteration publishes nothing again
    again = asyncio.run(run_iteration(settings, redis_client, 0, k=3, m=2))
    assert again.published == 0 and again.skipped == 3
    assert len(_entries(redis_client, run_id)) == len(entries)

    # the next iteration never repeats a query of the run
    asyncio.run(run_iteration(settings, redis_client, 1, k=3, m=2))
    later = [e for e in _entries(redis_client, run_id) if isinstance(e, RolloutGroup) and e.iteration == 1]
    assert len(later) == 3
    assert {g.adapter_version for g in later} == {rollout_service.admin()["current"]["version"]}
    assert not {normalize_query(g.query) for g in later} & {normalize_query(g.query) for g in groups}


def test_junk_generator_falls_back_to_unused_seed_queries(rollout_service, redis_client, run_id):
    settings = _settings(rollout_service, run_id, generation_attempts=1, generation_max_tokens=8)
    result = asyncio.run(run_iteration(settings, redis_client, 0, k=4, m=2))
    groups = [e for e in _entries(redis_client, run_id) if isinstance(e, RolloutGroup)]
    assert result.published == 4 and result.fallback >= 1
    seeds = {normalize_query(q.query) for q in load_queries(settings.seed_queries)}
    fallback = [g for g in groups if g.query_source == "seed_fallback"]
    assert len(fallback) == result.fallback and all(normalize_query(g.query) in seeds for g in fallback)


def test_offline_round_generates_its_queries_and_never_a_heldout_one(rollout_service, redis_client, run_id, tmp_path):
    seeds = load_queries("data/seed_queries.jsonl")
    heldout = tmp_path / "heldout.jsonl"  # every seed query but two is held out: the fallback may use only those two
    heldout.write_text("".join(json.dumps({"query": q.query.upper()}) + "\n" for q in seeds[2:]))
    settings = _settings(rollout_service, run_id, heldout_queries=heldout, generation_attempts=2, generation_max_tokens=8)
    result = asyncio.run(run_iteration(settings, redis_client, 0, k=5, m=2, offline=True))
    groups = [e for e in _entries(redis_client, run_id) if isinstance(e, RolloutGroup)]
    held = {normalize_query(q.query) for q in seeds[2:]}
    assert not {normalize_query(g.query) for g in groups} & held
    assert {g.query_source for g in groups} <= {"offline", "seed_fallback"}
    assert result.offline == sum(g.query_source == "offline" for g in groups)
    assert result.fallback == sum(g.query_source == "seed_fallback" for g in groups) <= 2
    assert all(g.adapter_version == "base" for g in groups)  # sampled once, from the starting policy


def test_a_response_cut_by_the_token_limit_is_flagged(rollout_service, redis_client, run_id):
    settings = _settings(rollout_service, run_id, max_tokens=3, generation_attempts=1, generation_max_tokens=8)
    result = asyncio.run(run_iteration(settings, redis_client, 0, k=2, m=4))
    groups = [e for e in _entries(redis_client, run_id) if isinstance(e, RolloutGroup)]
    reasons = [f for g in groups for f in g.finish_reasons]
    assert all(len(g.finish_reasons) == len(g.responses) == 4 for g in groups)
    assert set(reasons) <= {"length", "stop"} and "length" in reasons  # 3 tokens cannot hold a tagged document
    assert result.truncated == reasons.count("length") and result.responses == 8
    assert result.truncation_rate == reasons.count("length") / 8


def test_without_a_cap_the_budget_is_the_window_minus_the_prompt(rollout_service, redis_client, run_id):
    """max_tokens unset: vLLM gives the request window - prompt tokens, so a 3000-token prompt still fits and
    the response may run to the end of the 8192-token YaRN window rather than a fixed cap."""
    assert RolloutSettings.model_fields["max_tokens"].default is None
    settings = _settings(rollout_service, run_id, max_tokens=None)
    worker = RolloutWorker(settings, redis_client)

    async def probe() -> tuple:
        try:
            raw = await worker.samplers[0].chat.completions.create(
                model=settings.served_model_name,
                messages=[{"role": "user", "content": "a " * 3000}],
                n=1,
                max_tokens=settings.max_tokens,
                temperature=0.0,
            )
            return raw.usage.prompt_tokens, raw.usage.completion_tokens, raw.choices[0].finish_reason
        finally:
            await worker.aclose()

    prompt, completion, finish = asyncio.run(probe())
    listing = httpx.get(rollout_service.openai_base_url + "/models", headers=rollout_service.headers(), timeout=60).json()
    window = listing["data"][0]["max_model_len"]
    assert window == 8192 and prompt > 2048  # 4 x the tiny model's 2048: past the native window, YaRN serves it
    assert completion <= window - prompt and (finish == "stop" or completion == window - prompt)


def test_a_run_with_other_rope_settings_is_refused_before_sampling(rollout_service, redis_client, run_id):
    from shared.rope import RopeConfig, RopeMismatch
    from shared.runs import RunConfig, save_run_config

    save_run_config(redis_client, RunConfig(run_id=run_id, queries_per_iteration=2, responses_per_query=2,
                                            rope=RopeConfig(yarn_factor=2.0)))  # fmt: skip
    with pytest.raises(RopeMismatch, match=r"run \S+ asks for yarn_factor=2.0 but the rollout service is set to yarn_factor=4.0"):
        asyncio.run(run_iteration(_settings(rollout_service, run_id), redis_client, 0))
    assert _entries(redis_client, run_id) == []  # nothing sampled or published
