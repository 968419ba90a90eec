"""The judge HTTP API over real HTTP: results, null scores, batch, pairwise, the cache, 422, 502 with a reason,
500 for its own bugs, auth."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from services.judge.app import create_app
from services.judge.config import JudgeSettings
from tests.fixtures.judge import VALID_JUDGEMENT, Step, serve_in_thread

ITEM = {"instruction": "Write a report on SOE mixed-ownership reform.", "response": "<answer>Report text.</answer>"}


@pytest.fixture(scope="module")
def judge_app(scripted_backend):
    settings = JudgeSettings(
        base_url=scripted_backend.url, model="judge", max_retries=1, parse_retries=1, timeout_s=5.0,
        max_concurrency=1, max_input_chars=1000, max_batch_items=4, max_body_bytes=4096,
    )  # fmt: skip
    app = create_app(settings)
    with serve_in_thread(app) as url:
        yield app, url


@pytest.fixture(scope="module")
def judge_url(judge_app):
    return judge_app[1]


def _error(response) -> dict:
    """OpenAI's error shape, ``code`` the HTTP status."""
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == response.status_code, error
    return error


def test_health(judge_url):
    response = httpx.get(f"{judge_url}/health")
    assert response.status_code == 200 and response.json()["status"] == "ok"
    assert response.json()["cache"] is None  # no cache_url: no cache


def test_judge_returns_criteria_analysis_and_score(judge_url, backend):
    response = httpx.post(f"{judge_url}/v1/judge", json=ITEM, timeout=30)
    assert response.status_code == 200
    body = response.json()
    assert body["criteria"] == {
        "content_accuracy_relevance": 8, "tone_formality": 9, "idea_development_argumentation": 6,
        "structure_clarity": 7, "persuasiveness_effectiveness": 6,
    }  # fmt: skip
    assert body["analysis"] == VALID_JUDGEMENT["Analysis"]
    assert body["score"] == pytest.approx(72.0)
    assert (body["parse_error"], body["cached"], body["usage"]["total_tokens"]) == (None, False, 20)


def test_reference_answer_reaches_the_prompt(judge_url, backend):
    response = httpx.post(f"{judge_url}/v1/judge", json={**ITEM, "reference": "labeled answer"}, timeout=30)
    assert response.status_code == 200
    [(_, body)] = backend.calls
    assert "<Reference Answer>labeled answer</Reference Answer>" in body["messages"][0]["content"]


def test_retry_inside_the_service_is_invisible_to_the_caller(judge_url, backend):
    backend.script(Step(429, {"Retry-After": "0.2"}))
    response = httpx.post(f"{judge_url}/v1/judge", json=ITEM, timeout=30)
    assert response.status_code == 200 and len(backend.calls) == 2


@pytest.mark.parametrize(
    "body, field",
    [
        ({"response": "x"}, "instruction"),
        ({"instruction": "", "response": "x"}, "instruction"),
        ({"instruction": "q", "response": 3}, "response"),
        ({"instruction": "q", "response": "x", "extra": 1}, "extra"),
        ({"instruction": "q", "response": "x" * 1001}, "response"),
        ({"instruction": "q", "response": "x", "reference": "r" * 1001}, "reference"),
    ],
)
def test_bad_input_is_422_naming_the_field(judge_url, backend, body, field):
    response = httpx.post(f"{judge_url}/v1/judge", json=body, timeout=30)
    assert response.status_code == 422
    assert f"{field}: " in _error(response)["message"] and _error(response)["param"] == field
    assert backend.calls == []  # never reached the backend


def test_unjudgeable_backend_answer_is_a_null_score_not_an_error(judge_url, backend):
    backend.script(Step(content="Great essay!"), Step(content="Really great."))
    started = time.monotonic()
    response = httpx.post(f"{judge_url}/v1/judge", json=ITEM, timeout=30)
    assert response.status_code == 200
    body = response.json()
    assert (body["score"], body["criteria"]) == (None, None)
    assert "could not be judged" in body["parse_error"] and "after 2 answers" in body["parse_error"]
    assert body["usage"]["total_tokens"] == 40 and len(backend.calls) == 2
    assert time.monotonic() - started < 10


def test_failing_backend_is_502_not_500(judge_url, backend):
    backend.script(Step(500), Step(500))
    response = httpx.post(f"{judge_url}/v1/judge", json=ITEM, timeout=30)
    assert response.status_code == 502 and "HTTP 500" in _error(response)["message"]
    assert "after 2 attempts" in _error(response)["message"] and _error(response)["type"] == "upstream_error"


def test_a_bug_in_the_judge_itself_is_500_not_502(judge_app, backend, monkeypatch):
    app, url = judge_app

    async def broken(instruction: str, response: str, reference: str | None = None):
        raise KeyError("judge bug")

    monkeypatch.setattr(app.state.client, "judge", broken)
    response = httpx.post(f"{url}/v1/judge", json=ITEM, timeout=30)
    assert response.status_code == 500 and _error(response)["type"] == "server_error"
    assert "KeyError" in _error(response)["message"] and backend.calls == []


def test_batch_reports_each_items_result_or_error(judge_url, backend):
    # item 1 fails on both of its attempts (max_retries=1); item 3's answers never parse; the others succeed.
    backend.script(Step(503, match="second"), Step(503, match="second"), *[Step(content="fine", match="fourth")] * 2)
    items = [ITEM, {**ITEM, "response": "second"}, {**ITEM, "response": "third"}, {**ITEM, "response": "fourth"}]
    response = httpx.post(f"{judge_url}/v1/judge/batch", json={"items": items}, timeout=60)
    assert response.status_code == 200
    body = response.json()
    out = body["items"]
    assert [i["index"] for i in out] == [0, 1, 2, 3]
    assert out[0]["result"]["score"] == pytest.approx(72.0) and out[0]["error"] is None
    assert out[1]["result"] is None and "HTTP 503" in out[1]["error"]
    assert out[2]["result"]["criteria"]["tone_formality"] == 9
    assert out[3]["error"] is None and out[3]["result"]["score"] is None and out[3]["result"]["parse_error"]
    assert body["usage"]["total_tokens"] == 20 + 20 + 2 * 20  # the failed item reported no usage


@pytest.mark.parametrize(
    "body, field",
    [
        ({"items": []}, "items"),
        ({"items": [ITEM] * 5}, "items"),
        ({"items": [ITEM, {"instruction": "q"}]}, "items.1.response"),
        ({"items": [ITEM, {**ITEM, "response": "x" * 1001}]}, "items.1.response"),
    ],
)
def test_bad_batch_is_422(judge_url, backend, body, field):
    response = httpx.post(f"{judge_url}/v1/judge/batch", json=body, timeout=30)
    assert response.status_code == 422 and f"{field}: " in _error(response)["message"]


def verdict(winner: str) -> str:
    return json.dumps({"Analysis": "compared", "Winner": winner})


PAIR = {"instruction": ITEM["instruction"], "response_a": "alpha text", "response_b": "beta text"}


def test_pairwise_judges_both_orders(judge_url, backend):
    # a judge biased to the first position: an inconsistent pair, which counts as a tie
    backend.script(Step(content=verdict("A")), Step(content=verdict("A")))
    response = httpx.post(f"{judge_url}/v1/judge/pairwise", json=PAIR, timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["winner"], body["consistent"], body["cached"]) == ("tie", False, False)
    assert [(g["order"], g["winner"]) for g in body["games"]] == [("ab", "a"), ("ba", "b")]
    assert body["usage"]["total_tokens"] == 40 and len(backend.calls) == 2


def test_pairwise_consistent_winner_and_reference(judge_url, backend):
    backend.script(Step(content=verdict("B"), match="<Response A>alpha"), Step(content=verdict("A"), match="<Response A>beta"))
    response = httpx.post(f"{judge_url}/v1/judge/pairwise", json={**PAIR, "reference": "the key points"}, timeout=30)
    assert response.status_code == 200
    assert (response.json()["winner"], response.json()["consistent"]) == ("b", True)
    assert all("<Reference Answer>the key points</Reference Answer>" in b["messages"][0]["content"] for _, b in backend.calls)


@pytest.mark.parametrize(
    "body, field",
    [
        ({"instruction": "q", "response_a": "x"}, "response_b"),
        ({**PAIR, "response_a": "x" * 1001}, "response_a"),
        ({**PAIR, "response": "x"}, "response"),
    ],
)
def test_bad_pairwise_input_is_422(judge_url, backend, body, field):
    response = httpx.post(f"{judge_url}/v1/judge/pairwise", json=body, timeout=30)
    assert response.status_code == 422 and _error(response)["param"] == field and backend.calls == []


def test_pairwise_backend_failure_is_502(judge_url, backend):
    backend.script(*[Step(500)] * 4)
    response = httpx.post(f"{judge_url}/v1/judge/pairwise", json=PAIR, timeout=30)
    assert response.status_code == 502 and "HTTP 500" in _error(response)["message"]
    time.sleep(1.5)  # the first order failed after its 2 attempts; the other was cancelled before its second
    assert len(backend.calls) < 4


def test_cache_hits_show_in_the_answer_and_in_health(scripted_backend, backend, redis_client, redis_url):
    settings = JudgeSettings(base_url=scripted_backend.url, model="judge", cache_url=redis_url)
    with serve_in_thread(create_app(settings)) as url:
        assert httpx.get(f"{url}/health").json()["cache"] == {"hits": 0, "misses": 0, "errors": 0}
        first = httpx.post(f"{url}/v1/judge", json=ITEM, timeout=30).json()
        again = httpx.post(f"{url}/v1/judge", json=ITEM, timeout=30).json()
        assert (first["cached"], again["cached"]) == (False, True) and again["score"] == first["score"]
        assert again["usage"]["total_tokens"] == 0 and len(backend.calls) == 1
        pair = httpx.post(f"{url}/v1/judge/pairwise", json=PAIR, timeout=30).json()
        assert pair["winner"] is None and len(backend.calls) == 1 + 2 * 3  # unparsed games: asked 3 times, not cached
        assert httpx.get(f"{url}/health").json()["cache"] == {"hits": 1, "misses": 3, "errors": 0}


def test_bearer_key_is_enforced_when_configured(scripted_backend):
    settings = JudgeSettings(base_url=scripted_backend.url, model="judge", server_api_key="s3cret", backend_api_key="backend-key")
    with serve_in_thread(create_app(settings)) as url:
        missing = httpx.post(f"{url}/v1/judge", json=ITEM, timeout=30)
        assert missing.status_code == 401 and _error(missing)["type"] == "authentication_error"
        assert httpx.post(f"{url}/v1/judge", json=ITEM, headers={"Authorization": "Bearer backend-key"}).status_code == 401
        ok = httpx.post(f"{url}/v1/judge", json=ITEM, headers={"Authorization": "Bearer s3cret"}, timeout=30)
        assert ok.status_code == 200
        assert httpx.get(f"{url}/health").status_code == 200  # liveness stays open


def test_a_body_over_the_limit_is_413_before_parsing(judge_url):
    reply = httpx.post(judge_url + "/v1/judge", content=b'{"instruction": "' + b"x" * 5000 + b'"}',
                       headers={"content-type": "application/json"}, timeout=30)  # fmt: skip
    assert reply.status_code == 413 and "max_body_bytes" in _error(reply)["message"]
