"""The judge client against a real local HTTP backend: the SDK's transport retries, the separate parse
retries, null scores, bounded concurrency, usage and cost, reference answers."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from services.judge.client import JudgeBackendError, JudgeClient
from services.judge.config import JudgeSettings
from shared.local_redis import free_port
from tests.fixtures.judge import VALID_JUDGEMENT, Step

INSTRUCTION = "请撰写一份题为《国有企业改革三年行动总结》的报告"
RESPONSE = "<summary>s</summary><outline>o</outline><answer>正文……</answer>"


def settings_for(backend, **overrides) -> JudgeSettings:
    values = dict(base_url=backend.url, model="judge", max_retries=3, parse_retries=2, timeout_s=5.0)
    return JudgeSettings(**(values | overrides))


def run_client(settings: JudgeSettings, call):
    """``call(client)`` on a fresh client inside one event loop."""

    async def main():
        client = JudgeClient(settings)
        try:
            return await call(client)
        finally:
            await client.close()

    return asyncio.run(main())


def judge_once(settings: JudgeSettings, instruction: str = INSTRUCTION, response: str = RESPONSE, reference=None):
    return run_client(settings, lambda client: client.judge(instruction, response, reference))


def gaps(backend) -> list[float]:
    times = [t for t, _ in backend.calls]
    return [b - a for a, b in zip(times, times[1:])]


def prompts(backend) -> list[str]:
    return [body["messages"][0]["content"] for _, body in backend.calls]


def test_valid_answer_request_shape_and_usage(backend):
    result = judge_once(settings_for(backend))
    assert result.criteria.tone_formality == VALID_JUDGEMENT["Tone and Formality"]
    assert result.score == pytest.approx(72.0)
    assert (result.parse_error, result.cached) == (None, False)
    assert result.usage.model_dump() == {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20, "cost": 0.0}
    [(_, body)] = backend.calls
    assert body["model"] == "judge"
    assert INSTRUCTION in body["messages"][0]["content"] and "正文" in body["messages"][0]["content"]
    assert "<Reference Answer>" not in body["messages"][0]["content"]
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"]["required"][0] == "Analysis"


def test_reference_answer_appears_in_the_prompt_before_the_instructions(backend):
    judge_once(settings_for(backend), reference="参考答案：三年行动的主要成效")
    [prompt] = prompts(backend)
    block = "<Reference Answer>参考答案：三年行动的主要成效</Reference Answer>"
    assert prompt.index(f"<Response>{RESPONSE}</Response>") < prompt.index(block) < prompt.index("Instructions:")


def test_429_honours_retry_after_then_succeeds(backend):
    backend.script(Step(429, {"Retry-After": "1"}))
    result = judge_once(settings_for(backend))
    assert result.criteria.content_accuracy_relevance == 8
    assert len(backend.calls) == 2
    assert gaps(backend)[0] >= 0.95  # waited as told, not the SDK's 0.5 s backoff


def test_retry_after_ms_header_is_honoured(backend):
    backend.script(Step(429, {"retry-after-ms": "600"}), Step(503, {"Retry-After": "0"}))
    judge_once(settings_for(backend))
    assert len(backend.calls) == 3
    assert 0.55 <= gaps(backend)[0] < 2.0


def test_5xx_retried_by_the_sdk_with_growing_backoff(backend):
    backend.script(Step(500), Step(502))
    result = judge_once(settings_for(backend))
    assert result.criteria.structure_clarity == 7
    assert len(backend.calls) == 3
    first, second = gaps(backend)
    assert 0.3 <= first < second < 2.0  # 0.5 s, then 1 s, each less up to 25 % jitter


def test_timeout_is_retried(backend):
    backend.script(Step(delay=30.0))
    started = time.monotonic()
    result = judge_once(settings_for(backend, timeout_s=0.5))
    assert result.score == pytest.approx(72.0)
    assert len(backend.calls) == 2
    assert time.monotonic() - started < 20  # gave up on the 30 s answer instead of waiting for it


def test_persistent_failure_ends_with_a_reason_after_max_retries(backend):
    backend.script(*[Step(500)] * 10)
    with pytest.raises(JudgeBackendError, match=r"HTTP 500.*after 3 attempts"):
        judge_once(settings_for(backend, max_retries=2))
    assert len(backend.calls) == 3


def test_retry_after_beyond_the_sdk_limit_fails_at_once(backend):
    backend.script(Step(429, {"Retry-After": "3600"}))
    started = time.monotonic()
    with pytest.raises(JudgeBackendError, match=r"HTTP 429.*after 1 attempt\)"):
        judge_once(settings_for(backend))
    assert len(backend.calls) == 1 and time.monotonic() - started < 2


def test_client_errors_are_not_retried(backend):
    backend.script(Step(401), Step(404))
    with pytest.raises(JudgeBackendError, match=r"HTTP 401.*after 1 attempt\)"):
        judge_once(settings_for(backend))
    assert len(backend.calls) == 1


def test_unjudgeable_answer_is_asked_again(backend):
    backend.script(Step(content="I'd rate this response quite highly overall."))
    result = judge_once(settings_for(backend))
    assert result.criteria.persuasiveness_effectiveness == 6
    assert len(backend.calls) == 2
    assert result.usage.total_tokens == 40  # the unparsed answer was paid for too


def test_always_unjudgeable_answer_is_a_null_score_with_the_reason(backend):
    bad = json.dumps({**VALID_JUDGEMENT, "Tone and Formality": 42})
    backend.script(*[Step(content=bad)] * 5)
    result = judge_once(settings_for(backend, parse_retries=1))
    assert (result.score, result.criteria) == (None, None)
    assert result.parse_error == "answer could not be judged: tone_formality = 42 is outside 1-10 (after 2 answers)"
    assert len(backend.calls) == 2 and result.usage.total_tokens == 40


def test_parse_retries_and_transport_retries_are_separate_budgets(backend):
    # one transport retry and one parse retry: each failure spends only its own budget
    backend.script(Step(500), Step(content="no verdict here"), Step(503))
    result = judge_once(settings_for(backend, max_retries=1, parse_retries=1))
    assert result.score == pytest.approx(72.0) and len(backend.calls) == 4


def test_malformed_200_body_is_an_unparsed_answer(backend):
    backend.script(Step(raw='{"id": "x", "choices": []}'), Step(raw="not json at all"))
    result = judge_once(settings_for(backend, parse_retries=2))
    assert result.score == pytest.approx(72.0)
    assert len(backend.calls) == 3


def test_backend_without_structured_output_falls_back_to_plain_prompting(backend):
    rejected = json.dumps({"error": {"message": "response_format json_schema is not supported", "type": "invalid_request_error"}})
    backend.script(Step(400, raw=rejected))
    result = judge_once(settings_for(backend, max_retries=0))  # the fallback is not a retry
    assert result.score == pytest.approx(72.0)
    first, second = (body for _, body in backend.calls)
    assert "response_format" in first and "response_format" not in second


def test_unreachable_backend_fails_with_a_reason_in_bounded_time():
    settings = JudgeSettings(base_url=f"http://127.0.0.1:{free_port()}/v1", max_retries=1)
    started = time.monotonic()
    with pytest.raises(JudgeBackendError, match=r"unreachable.*after 2 attempts"):
        judge_once(settings)
    assert time.monotonic() - started < 5


def test_concurrency_is_bounded(backend):
    backend.script(*[Step(delay=0.3)] * 6)

    async def six(client):
        return await asyncio.gather(*(client.judge(INSTRUCTION, RESPONSE) for _ in range(6)))

    results = run_client(settings_for(backend, max_concurrency=2), six)
    assert len(results) == 6 and all(r.score == pytest.approx(72.0) for r in results)
    assert backend.max_in_flight == 2


def test_cost_from_the_per_million_token_prices(backend):
    backend.script(Step(content="no verdict"))  # two answers paid for: 2 x (10 prompt + 10 completion)
    result = judge_once(settings_for(backend, prompt_price_per_1m=2.5, completion_price_per_1m=10.0))
    assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.total_tokens) == (20, 20, 40)
    assert result.usage.cost == pytest.approx((20 * 2.5 + 20 * 10.0) / 1e6)


# ----------------------------------------------------------------------------------------------- pairwise

ALPHA, BETA = "alpha report: covers the outline", "beta report: skips a section"


def verdict(winner: str, analysis: str = "compared") -> str:
    return json.dumps({"Analysis": analysis, "Winner": winner})


def pairwise_once(settings: JudgeSettings, a: str = ALPHA, b: str = BETA, reference=None):
    return run_client(settings, lambda client: client.judge_pairwise(INSTRUCTION, a, b, reference))


def first_shown(text: str) -> str:
    """A backend ``match`` for the game that shows ``text`` as Response A."""
    return f"<Response A>{text}</Response A>"


def test_pairwise_asks_both_orders_and_agrees_when_the_judge_is_consistent(backend):
    # the judge prefers alpha wherever it stands: "A" when alpha is shown first, "B" when second
    alpha_first = Step(content=verdict("A", "alpha first"), match=first_shown(ALPHA))
    backend.script(alpha_first, Step(content=verdict("B", "alpha second"), match=first_shown(BETA)))
    result = pairwise_once(settings_for(backend))
    assert (result.winner, result.consistent, result.cached) == ("a", True, False)
    ab, ba = result.games
    assert (ab.order, ab.winner, ab.analysis) == ("ab", "a", "alpha first")
    assert (ba.order, ba.winner, ba.analysis) == ("ba", "a", "alpha second")
    assert result.usage.total_tokens == 40
    bodies = [body for _, body in backend.calls]
    assert sorted(first_shown(ALPHA) in p for p in prompts(backend)) == [False, True]
    assert all(b["response_format"]["json_schema"]["schema"]["properties"]["Winner"]["enum"] == ["A", "B", "tie"] for b in bodies)


def test_pairwise_position_bias_is_inconsistent_and_counts_as_a_tie(backend):
    backend.script(Step(content=verdict("A")), Step(content=verdict("A")))  # always the first shown
    result = pairwise_once(settings_for(backend))
    assert [g.winner for g in result.games] == ["a", "b"]
    assert (result.winner, result.consistent) == ("tie", False)


def test_pairwise_tie_in_both_orders_is_a_consistent_tie(backend):
    backend.script(Step(content="Both are equally good. [[C]]"), Step(content=verdict("tie")))
    result = pairwise_once(settings_for(backend))
    assert (result.winner, result.consistent) == ("tie", True)


def test_pairwise_unparsed_game_gives_no_winner(backend):
    backend.script(Step(content=verdict("A"), match=first_shown(ALPHA)), *[Step(content="Hard to say.")] * 2)
    result = pairwise_once(settings_for(backend, parse_retries=1))
    assert (result.winner, result.consistent) == (None, None)
    ab, ba = result.games
    assert ab.winner == "a" and ab.parse_error is None
    assert ba.winner is None and "no JSON object with a Winner" in ba.parse_error and "after 2 answers" in ba.parse_error


def test_pairwise_reference_answer_is_in_both_prompts(backend):
    backend.script(Step(content=verdict("A")), Step(content=verdict("B")))
    pairwise_once(settings_for(backend), reference="the labeled answer")
    assert all("<Reference Answer>the labeled answer</Reference Answer>" in p for p in prompts(backend))


# ----------------------------------------------------------------------------------------------- cache


def test_cache_answers_a_repeated_judgment_without_the_backend(backend, redis_client, redis_url):
    settings = settings_for(backend, cache_url=redis_url, prompt_price_per_1m=1.0)

    async def three(client):
        first = await client.judge(INSTRUCTION, RESPONSE)
        second = await client.judge(INSTRUCTION, RESPONSE)
        other = await client.judge(INSTRUCTION, RESPONSE, reference="changes the prompt")
        return first, second, other, client.cache.counters()

    first, second, other, counters = run_client(settings, three)
    assert (first.cached, second.cached, other.cached) == (False, True, False)
    assert second.model_dump(exclude={"cached", "usage"}) == first.model_dump(exclude={"cached", "usage"})
    assert first.usage.cost > 0 and second.usage.total_tokens == 0 and second.usage.cost == 0.0
    assert len(backend.calls) == 2  # the repeat never reached the backend
    assert counters == {"hits": 1, "misses": 2, "errors": 0}
    assert len(redis_client.keys("grace:judge:cache:*")) == 2
    # another process with the same settings shares it; another judge model or temperature does not
    assert judge_once(settings).cached
    assert not judge_once(settings_for(backend, cache_url=redis_url, model="other-judge")).cached
    assert not judge_once(settings_for(backend, cache_url=redis_url, temperature=0.7)).cached
    assert len(backend.calls) == 4


def test_cache_keeps_no_unparsed_answer(backend, redis_client, redis_url):
    backend.script(Step(content="no verdict"))
    settings = settings_for(backend, cache_url=redis_url, parse_retries=0)
    assert judge_once(settings).score is None
    again = judge_once(settings)
    assert again.score == pytest.approx(72.0) and not again.cached and len(backend.calls) == 2


def test_pairwise_games_are_cached_in_either_order(backend, redis_client, redis_url):
    settings = settings_for(backend, cache_url=redis_url)
    backend.script(Step(content=verdict("A"), match=first_shown(ALPHA)), Step(content=verdict("B"), match=first_shown(BETA)))
    first = pairwise_once(settings)
    swapped = pairwise_once(settings, a=BETA, b=ALPHA)  # the same two prompts, with the roles exchanged
    assert not first.cached and swapped.cached and len(backend.calls) == 2 and swapped.usage.total_tokens == 0
    assert (first.winner, swapped.winner) == ("a", "b")  # alpha both times


def test_an_unreachable_cache_is_a_miss_not_a_failure(backend):
    settings = settings_for(backend, cache_url=f"redis://127.0.0.1:{free_port()}/0")

    async def judged(client):
        return await client.judge(INSTRUCTION, RESPONSE), client.cache.counters()

    result, counters = run_client(settings, judged)
    assert result.score == pytest.approx(72.0) and not result.cached
    assert counters == {"hits": 0, "misses": 1, "errors": 2}  # the lookup and the write
