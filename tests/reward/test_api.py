"""The reward HTTP API over real HTTP against `grace serve reward` (tiny models, small limits)."""

import concurrent.futures
import re

import httpx
import pytest

from tests.reward.test_scorer import DOC_OTHER, DOC_SHORT, structured

METRIC_KEYS = {
    "length", "diversity", "professionalism", "general_perplexity", "domain_perplexity",
    "relevance_summary", "relevance_document",
}  # fmt: skip


@pytest.fixture(scope="module")
def api(reward_service):
    with httpx.Client(base_url=reward_service.url, headers=reward_service.headers, timeout=120) as client:
        yield client


def _error(reply) -> dict:
    """OpenAI's error shape, ``code`` the HTTP status."""
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == reply.status_code, error
    return error


def _names(reply, loc: list) -> bool:
    """The 422 message names the field: ``["body", "groups", 0, "query"]`` as ``groups.0.query: ...``."""
    field = ".".join(map(str, loc[1:]))
    return re.search(rf"(^|; ){re.escape(field)}: ", _error(reply)["message"]) is not None


def test_health_ready_docs_and_metrics(api):
    assert api.get("/health").json() == {"status": "ok"}
    ready = api.get("/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    paths = api.get("/openapi.json").json()["paths"]
    assert {"/v1/score", "/v1/calibrate", "/health", "/ready", "/metrics"} <= set(paths)
    assert api.get("/docs").status_code == 200
    api.post("/v1/calibrate", json={"groups": [{"responses": [{"parsed": False}]}]})
    text = api.get("/metrics").text
    assert 'grace_reward_requests_total{route="/v1/calibrate",status="200"}' in text
    assert "grace_reward_ready 1.0" in text


def test_score_contract_and_dataset_wide_normalization(api):
    body = {
        "groups": [
            {"query": "Report on SOE reform", "responses": [structured("s1", DOC_SHORT), "", structured("s2", DOC_OTHER)],
             "finish_reasons": ["stop", "length", "stop"]},
            {"query": "国企改革报告", "responses": [structured("摘要", DOC_OTHER * 2), "just text, no tags"]},
        ]
    }  # fmt: skip
    reply = api.post("/v1/score", json=body)
    assert reply.status_code == 200, reply.text
    groups = reply.json()["groups"]
    assert [g["query"] for g in groups] == ["Report on SOE reform", "国企改革报告"]
    results = [r for g in groups for r in g["results"]]
    assert [r["index"] for g in groups for r in g["results"]] == [0, 1, 2, 0, 1]
    assert [r["parsed"] for r in results] == [True, False, True, True, False]
    for r in results:
        assert set(r) == {"index", "parsed", "metrics", "rank_sum", "z", "weight", "finish_reason"}
        if r["parsed"]:
            assert set(r["metrics"]) == METRIC_KEYS and r["rank_sum"] is not None and r["z"] is not None
        else:
            assert r["metrics"] is None and r["rank_sum"] is None and r["z"] is None and r["weight"] == -1.0
    parsed = [r for r in results if r["parsed"]]
    pos = [r["weight"] for r in parsed if r["z"] >= 0]
    neg = [r["weight"] for r in parsed if r["z"] < 0]
    assert sum(pos) == pytest.approx(len(pos)) and sum(neg) == pytest.approx(-len(neg))
    assert len(pos) == 2 and len(neg) == 1  # group 1: z = +1 / -1; group 2's single response: z = 0, weight 0
    assert groups[1]["results"][0]["z"] == 0.0 and groups[1]["results"][0]["weight"] == 0.0
    # finish reasons are echoed ('length' = truncated); a group that sends none gets null
    assert [r["finish_reason"] for r in results] == ["stop", "length", "stop", None, None]


def test_finish_reasons_must_match_the_responses(api):
    body = {"groups": [{"query": "q", "responses": ["a", "b"], "finish_reasons": ["stop"]}]}
    reply = api.post("/v1/score", json=body)
    assert reply.status_code == 422 and "finish_reasons has 1 entries for 2 responses" in reply.text


def test_calibrate_needs_no_model_and_matches_score(api):
    body = {"groups": [{"query": "q", "responses": [structured("a", DOC_SHORT), structured("b", DOC_OTHER), "x"]}]}
    scored = api.post("/v1/score", json=body).json()["groups"][0]["results"]
    items = [{"parsed": r["parsed"], "metrics": r["metrics"]} for r in scored]
    calibrated = api.post("/v1/calibrate", json={"groups": [{"responses": items}]})
    assert calibrated.status_code == 200, calibrated.text
    assert calibrated.json()["groups"][0]["results"] == scored
    assert calibrated.json()["groups"][0]["query"] is None


@pytest.mark.parametrize(
    "body, loc",
    [
        ({"groups": []}, ["body", "groups"]),
        ({}, ["body", "groups"]),
        ({"groups": [{"query": "q", "responses": []}]}, ["body", "groups", 0, "responses"]),
        ({"groups": [{"query": "", "responses": ["a"]}]}, ["body", "groups", 0, "query"]),
        ({"groups": [{"query": "q", "responses": [1]}]}, ["body", "groups", 0, "responses", 0]),
        ({"groups": [{"query": "q", "responses": "abc"}]}, ["body", "groups", 0, "responses"]),
        ({"groups": [{"query": "q", "responses": ["a"], "extra": 1}]}, ["body", "groups", 0, "extra"]),
        ({"groups": [{"query": "q", "responses": ["a"]}] * 4}, ["body", "groups"]),  # max_groups 3
        ({"groups": [{"query": "q", "responses": ["a"] * 5}]}, ["body", "groups", 0, "responses"]),  # max 4
        ({"groups": [{"query": "q", "responses": ["a", "x" * 6001]}]}, ["body", "groups", 0, "responses", 1]),
        ({"groups": [{"query": "q" * 501, "responses": ["a"]}]}, ["body", "groups", 0, "query"]),
    ],
)
def test_score_rejects_bad_bodies_naming_the_field(api, body, loc):
    reply = api.post("/v1/score", json=body)
    assert reply.status_code == 422, reply.text
    assert _names(reply, loc), reply.text
    assert _error(reply)["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "item, loc_tail",
    [
        ({"parsed": True}, ["metrics"]),
        ({"parsed": True, "metrics": {"length": 1}}, ["metrics", "diversity"]),
        ({"parsed": "maybe", "metrics": None}, ["parsed"]),
    ],
)
def test_calibrate_rejects_bad_items_naming_the_field(api, item, loc_tail):
    reply = api.post("/v1/calibrate", json={"groups": [{"responses": [item]}]})
    assert reply.status_code == 422, reply.text
    assert _names(reply, ["body", "groups", 0, "responses", 0, *loc_tail]), reply.text


def test_non_finite_metrics_are_422_not_500(api):
    metrics = dict.fromkeys(METRIC_KEYS, 1.0)
    raw = '{"groups": [{"responses": [{"parsed": true, "metrics": %s}]}]}' % str(metrics).replace("'", '"').replace(
        "1.0", "NaN", 1
    )
    reply = api.post("/v1/calibrate", content=raw, headers={"content-type": "application/json"})
    assert reply.status_code == 422 and _names(reply, ["body", "groups", 0, "responses", 0, "metrics"]), reply.text


@pytest.mark.parametrize("raw", ['{"groups": [', "not json", '{"groups": [{"query": "q", "responses": ["a",]}]}', ""])
def test_malformed_json_is_a_4xx_with_a_message(api, raw):
    reply = api.post("/v1/score", content=raw, headers={"content-type": "application/json"})
    assert reply.status_code in (400, 422), reply.text
    assert _error(reply)["message"]


def test_oversize_body_is_413(api, reward_service):
    limit = reward_service.limits["max_body_bytes"]
    big = {"groups": [{"query": "q", "responses": ["x" * (limit + 10)]}]}
    reply = api.post("/v1/score", json=big)
    assert reply.status_code == 413 and "max_body_bytes" in _error(reply)["message"]

    def chunks():  # no Content-Length: counted while streaming
        for _ in range(limit // 1000 + 2):
            yield b" " * 1000

    reply = api.post("/v1/score", content=chunks(), headers={"content-type": "application/json"})
    assert reply.status_code == 413


def test_api_key_is_required_when_configured(reward_service):
    body = {"groups": [{"responses": [{"parsed": False}]}]}
    with httpx.Client(base_url=reward_service.url, timeout=30) as client:
        assert client.post("/v1/calibrate", json=body).status_code == 401
        wrong = client.post("/v1/calibrate", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        assert _error(wrong)["type"] == "authentication_error"
        assert client.post("/v1/calibrate", json=body, headers=reward_service.headers).status_code == 200
        assert client.get("/health").status_code == 200  # probes stay open


def test_excess_concurrent_requests_get_503_with_retry_after(reward_service):
    # one slot and one queue place: of several simultaneous heavy requests, some must be turned away
    long_doc = (DOC_SHORT + " ") * 60
    body = {
        "groups": [
            {"query": f"q{g}", "responses": [structured(f"s{i}", long_doc[: 5500 - i]) for i in range(4)]} for g in range(2)
        ]
    }
    assert len(str(body)) < reward_service.limits["max_body_bytes"]

    def post(_):
        with httpx.Client(base_url=reward_service.url, headers=reward_service.headers, timeout=300) as client:
            return client.post("/v1/score", json=body)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(post, range(6)))
    codes = sorted(r.status_code for r in replies)
    assert codes.count(200) >= 2 and 503 in codes, codes
    busy = next(r for r in replies if r.status_code == 503)
    assert busy.headers["retry-after"] == str(reward_service.limits["retry_after_s"])
    assert "queue" in _error(busy)["message"] and _error(busy)["type"] == "service_unavailable"
