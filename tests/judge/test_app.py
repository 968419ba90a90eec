"""The judge HTTP API over real HTTP: results, batch, 422, 502 with a reason, 500 for its own bugs, auth."""

from __future__ import annotations

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
        base_url=scripted_backend.url, model="judge", max_retries=1, backoff_base_s=0.05, timeout_s=5.0,
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
    ],
)
def test_bad_input_is_422_naming_the_field(judge_url, backend, body, field):
    response = httpx.post(f"{judge_url}/v1/judge", json=body, timeout=30)
    assert response.status_code == 422
    assert f"{field}: " in _error(response)["message"] and _error(response)["param"] == field
    assert backend.calls == []  # never reached the backend


def test_unjudgeable_backend_answer_is_502_with_the_reason(judge_url, backend):
    backend.script(Step(content="Great essay!"), Step(content="Really great."))
    started = time.monotonic()
    response = httpx.post(f"{judge_url}/v1/judge", json=ITEM, timeout=30)
    assert response.status_code == 502
    message = _error(response)["message"]
    assert "could not be judged" in message and "after 2 attempts" in message
    assert _error(response)["type"] == "upstream_error"
    assert time.monotonic() - started < 10


def test_failing_backend_is_502_not_500(judge_url, backend):
    backend.script(Step(500), Step(500))
    response = httpx.post(f"{judge_url}/v1/judge", json=ITEM, timeout=30)
    assert response.status_code == 502 and "HTTP 500" in _error(response)["message"]


def test_a_bug_in_the_judge_itself_is_500_not_502(judge_app, backend, monkeypatch):
    app, url = judge_app

    async def broken(instruction: str, response: str):
        raise KeyError("judge bug")

    monkeypatch.setattr(app.state.client, "judge", broken)
    response = httpx.post(f"{url}/v1/judge", json=ITEM, timeout=30)
    assert response.status_code == 500 and _error(response)["type"] == "server_error"
    assert "KeyError" in _error(response)["message"] and backend.calls == []


def test_batch_reports_each_items_result_or_error(judge_url, backend):
    # item 1 fails on both of its attempts (max_retries=1); the others succeed.
    backend.script(Step(503, match="second"), Step(503, match="second"))
    items = [ITEM, {**ITEM, "response": "second"}, {**ITEM, "response": "third"}]
    response = httpx.post(f"{judge_url}/v1/judge/batch", json={"items": items}, timeout=60)
    assert response.status_code == 200
    out = response.json()["items"]
    assert [i["index"] for i in out] == [0, 1, 2]
    assert out[0]["result"]["score"] == pytest.approx(72.0) and out[0]["error"] is None
    assert out[1]["result"] is None and "HTTP 503" in out[1]["error"]
    assert out[2]["result"]["criteria"]["tone_formality"] == 9


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


def test_bearer_key_is_enforced_when_configured(scripted_backend):
    settings = JudgeSettings(base_url=scripted_backend.url, model="judge", server_api_key="s3cret", api_key="backend-key")
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
