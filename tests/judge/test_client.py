"""Retries, backoff, Retry-After and bounded concurrency against a real local HTTP backend."""

from __future__ import annotations

import asyncio
import email.utils
import json
import time

import pytest

from services.judge.client import JudgeBackendError, JudgeClient, backoff_seconds, retry_after_seconds
from services.judge.config import JudgeSettings
from tests.fixtures.judge import VALID_JUDGEMENT, Step

INSTRUCTION = "请撰写一份题为《国有企业改革三年行动总结》的报告"
RESPONSE = "<summary>s</summary><outline>o</outline><answer>正文……</answer>"


def settings_for(backend, **overrides) -> JudgeSettings:
    values = dict(base_url=backend.url, model="judge", backoff_base_s=0.05, backoff_max_s=0.2, max_retries=3,
                  timeout_s=5.0, max_retry_after_s=10.0)  # fmt: skip
    return JudgeSettings(**(values | overrides))


def judge_once(settings: JudgeSettings, instruction: str = INSTRUCTION, response: str = RESPONSE):
    async def main():
        client = JudgeClient(settings)
        try:
            return await client.judge(instruction, response)
        finally:
            await client.close()

    return asyncio.run(main())


def gaps(backend) -> list[float]:
    times = [t for t, _ in backend.calls]
    return [b - a for a, b in zip(times, times[1:])]


def test_valid_answer_and_request_shape(backend):
    result = judge_once(settings_for(backend))
    assert result.criteria.tone_formality == VALID_JUDGEMENT["Tone and Formality"]
    assert result.score == pytest.approx(72.0)
    [(_, body)] = backend.calls
    assert body["model"] == "judge"
    assert INSTRUCTION in body["messages"][0]["content"] and "正文" in body["messages"][0]["content"]
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"]["required"][0] == "Analysis"


def test_429_honours_retry_after_then_succeeds(backend):
    backend.script(Step(429, {"Retry-After": "1"}))
    result = judge_once(settings_for(backend))
    assert result.criteria.content_accuracy_relevance == 8
    assert len(backend.calls) == 2
    assert gaps(backend)[0] >= 0.95  # waited as told, not the 0.05 s backoff


def test_retry_after_ms_header_is_honoured(backend):
    backend.script(Step(429, {"retry-after-ms": "600"}), Step(503, {"Retry-After": "0"}))
    judge_once(settings_for(backend))
    assert len(backend.calls) == 3
    assert 0.55 <= gaps(backend)[0] < 2.0


def test_5xx_retried_with_backoff_then_succeeds(backend):
    backend.script(Step(500), Step(502), Step(503))
    result = judge_once(settings_for(backend))
    assert result.criteria.structure_clarity == 7
    assert len(backend.calls) == 4
    assert all(0.02 <= g < 1.0 for g in gaps(backend))


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


def test_retry_after_beyond_the_limit_fails_at_once(backend):
    backend.script(Step(429, {"Retry-After": "3600"}))
    started = time.monotonic()
    with pytest.raises(JudgeBackendError, match="Retry-After 3600s exceeds"):
        judge_once(settings_for(backend))
    assert len(backend.calls) == 1 and time.monotonic() - started < 2


def test_client_errors_are_not_retried(backend):
    backend.script(Step(401), Step(404))
    with pytest.raises(JudgeBackendError, match="HTTP 401"):
        judge_once(settings_for(backend))
    assert len(backend.calls) == 1


def test_unjudgeable_answer_is_asked_again(backend):
    backend.script(Step(content="I'd rate this response quite highly overall."))
    result = judge_once(settings_for(backend))
    assert result.criteria.persuasiveness_effectiveness == 6
    assert len(backend.calls) == 2


def test_always_unjudgeable_answer_gives_the_parse_reason(backend):
    bad = json.dumps({**VALID_JUDGEMENT, "Tone and Formality": 42})
    backend.script(*[Step(content=bad)] * 5)
    with pytest.raises(JudgeBackendError, match=r"could not be judged: tone_formality = 42 is outside 1-10"):
        judge_once(settings_for(backend, max_retries=1))
    assert len(backend.calls) == 2


def test_malformed_200_body_is_retried(backend):
    backend.script(Step(raw='{"id": "x", "choices": []}'), Step(raw="not json at all"))
    result = judge_once(settings_for(backend))
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
    from shared.local_redis import free_port

    settings = JudgeSettings(base_url=f"http://127.0.0.1:{free_port()}/v1", max_retries=1, backoff_base_s=0.05)
    started = time.monotonic()
    with pytest.raises(JudgeBackendError, match="unreachable"):
        judge_once(settings)
    assert time.monotonic() - started < 5


def test_concurrency_is_bounded(backend):
    backend.script(*[Step(delay=0.3)] * 6)

    async def main():
        client = JudgeClient(settings_for(backend, max_concurrency=2))
        try:
            return await asyncio.gather(*(client.judge(INSTRUCTION, RESPONSE) for _ in range(6)))
        finally:
            await client.close()

    results = asyncio.run(main())
    assert len(results) == 6 and all(r.score == pytest.approx(72.0) for r in results)
    assert backend.max_in_flight == 2


def test_retry_after_parsing():
    assert retry_after_seconds({"retry-after": "2"}) == 2.0
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_seconds({"retry-after": "-5"}) == 0.0
    assert retry_after_seconds({"retry-after": "soon"}) is None
    assert retry_after_seconds({}) is None and retry_after_seconds(None) is None
    now = time.time()
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert retry_after_seconds({"retry-after": date}, now=now) == pytest.approx(30, abs=1.0)


def test_backoff_grows_exponentially_with_bounded_jitter():
    assert backoff_seconds(0, 1.0, 30.0, rand=lambda: 1.0) == 1.0
    assert backoff_seconds(3, 1.0, 30.0, rand=lambda: 1.0) == 8.0
    assert backoff_seconds(10, 1.0, 30.0, rand=lambda: 1.0) == 30.0
    assert backoff_seconds(3, 1.0, 30.0, rand=lambda: 0.0) == 4.0
