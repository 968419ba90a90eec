"""Property-based tests generated from each service's OpenAPI schema (schemathesis), run against the real apps.

- the reward API: ``grace serve reward`` (a subprocess, tiny models, small limits, a key), over real HTTP;
- the judge API: the real app on a scripted OpenAI-compatible backend, in a thread, over real HTTP;
- the rollout gateway: the real ``grace serve rollout`` (vLLM on the tiny model). Only the gateway's own
  contract is fuzzed: /health, /admin/*, /v1/models, and chat bodies whose ``model``, ``n`` and
  ``max_tokens`` the gateway reads. The rest of a proxied body goes to vLLM byte for byte, so fuzzing
  vLLM's whole API through it would test vLLM, slowly (every accepted body is a generation on CPU).

Every operation must answer without a 5xx, every 4xx in OpenAI's error shape with a message, every
response as its schema documents it (status, content type, body); the service still answers /health.
The schemas themselves are checked too: optional auth when no key is set, the documented error codes,
the configured limits, ``/metrics`` as Prometheus text.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import negative_data_rejection

from tests.fixtures.judge import serve_in_thread

pytestmark = pytest.mark.integration

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
MODES = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]


def assert_openai_error(response) -> None:
    """A 4xx has OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}`` with a message."""
    if not 400 <= response.status_code < 500:
        return
    body = response.json()
    error = body.get("error") if isinstance(body, dict) else None
    assert isinstance(error, dict) and set(error) >= {"message", "type", "param", "code"}, response.text
    assert isinstance(error["message"], str) and error["message"].strip(), response.text
    assert error["code"] == response.status_code, response.text


def fuzz(schema, operation: str, mode: GenerationMode, headers: dict | None = None) -> None:
    """``max_examples`` generated requests to one operation: no 5xx, OpenAI-shaped 4xx, responses as documented."""
    method, path = operation.split(" ", 1)
    api_operation = schema[path][method]
    if mode == GenerationMode.NEGATIVE and not (api_operation.body or api_operation.query or api_operation.headers):
        mode = GenerationMode.POSITIVE  # nothing to make invalid: the plain request must still hold the contract
    strategy = api_operation.as_strategy(mode)
    if mode == GenerationMode.POSITIVE:
        strategy = strategy.filter(one_finish_reason_per_response).map(openrlhf_shaped)

    @FUZZ
    @given(case=strategy)
    def run(case) -> None:
        response = case.call(headers=headers, timeout=120)
        assert response.status_code < 500, f"{case.method} {case.formatted_path} {case.body!r}: {response.text}"
        assert_openai_error(response)
        # 413 (max_body_bytes) rejects a body as surely as 422: not an invalid body "accepted"
        excluded = [negative_data_rejection] if response.status_code == 413 else []
        case.validate_response(response, headers=headers, excluded_checks=excluded)

    run()


def one_finish_reason_per_response(case) -> bool:
    """The one rule of the reward API that JSON Schema cannot say (its description does)."""
    groups = case.body.get("groups") if isinstance(case.body, dict) else None
    return not any(
        isinstance(g, dict) and isinstance(g.get("finish_reasons"), list) and len(g["finish_reasons"]) != len(g["responses"])
        for g in groups or []
    )


def openrlhf_shaped(case):
    """Positive /get_reward bodies as OpenRLHF sends them: one prompt per query, each query = prompt + response,
    within the service's per-group limits (rules JSON Schema cannot say; the field descriptions do)."""
    body = case.body
    if (
        case.path == "/get_reward"
        and isinstance(body, dict)
        and isinstance(body.get("query"), list)
        and isinstance(body.get("prompts"), list)
    ):
        prompts = (body["prompts"] or ["p"])[:3]  # max_groups: 3 distinct prompts
        query = body["query"][: len(prompts) * 4] or [""]  # max_responses: 4 per prompt
        pairs = [(prompts[i % len(prompts)], q[:100]) for i, q in enumerate(query)]
        body["prompts"] = [p for p, _ in pairs]
        body["query"] = [p + r for p, r in pairs]
    return case


def operations(schema) -> set[str]:
    return {f"{op.ok().method.upper()} {op.ok().path}" for op in schema.get_all_operations()}


# ----------------------------------------------------------------------------------------------- reward

REWARD_OPERATIONS = ["GET /health", "GET /ready", "GET /metrics", "POST /v1/score", "POST /v1/calibrate", "POST /get_reward"]


@pytest.fixture(scope="module")
def reward_schema(reward_service):
    schema = schemathesis.openapi.from_url(f"{reward_service.url}/openapi.json")
    assert operations(schema) == set(REWARD_OPERATIONS)
    return schema


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("operation", REWARD_OPERATIONS)
def test_fuzz_reward_api(reward_schema, reward_service, operation, mode):
    fuzz(reward_schema, operation, mode, reward_service.headers)


def test_reward_service_survives_fuzzing(reward_service):
    assert httpx.get(f"{reward_service.url}/health", timeout=10).json() == {"status": "ok"}


# ----------------------------------------------------------------------------------------------- judge

JUDGE_OPERATIONS = ["GET /health", "POST /v1/judge", "POST /v1/judge/batch", "POST /v1/judge/pairwise"]


@pytest.fixture(scope="module")
def judge_url(scripted_backend):
    from services.judge.app import create_app
    from services.judge.config import JudgeSettings

    settings = JudgeSettings(
        base_url=scripted_backend.url, model="judge", max_retries=0, timeout_s=5.0,
        max_input_chars=2000, max_batch_items=4, max_body_bytes=16384,
    )  # fmt: skip
    scripted_backend.script()
    with serve_in_thread(create_app(settings)) as url:
        yield url


@pytest.fixture(scope="module")
def judge_schema(judge_url):
    schema = schemathesis.openapi.from_url(f"{judge_url}/openapi.json")
    assert operations(schema) == set(JUDGE_OPERATIONS)
    return schema


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("operation", JUDGE_OPERATIONS)
def test_fuzz_judge_api(judge_schema, operation, mode):
    fuzz(judge_schema, operation, mode)


def test_judge_survives_fuzzing(judge_url):
    assert httpx.get(f"{judge_url}/health", timeout=10).status_code == 200


# ----------------------------------------------------------------------------------------------- gateway

GATEWAY_OPERATIONS = ["GET /health", "GET /admin/adapters", "GET /admin/rope", "GET /v1/models"]
PROXIED = ["POST /v1/chat/completions", "POST /v1/completions", "POST /v1/{path}"]  # fuzzed below, not here
GATEWAY_FUZZ = settings(FUZZ, max_examples=20)


@pytest.fixture(scope="module")
def gateway_schema(rollout_service):
    schema = schemathesis.openapi.from_url(f"{rollout_service.base_url}/openapi.json")
    assert operations(schema) == set(GATEWAY_OPERATIONS + PROXIED)
    return schema


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("operation", GATEWAY_OPERATIONS)
def test_fuzz_gateway_api(gateway_schema, rollout_service, operation, mode):
    fuzz(gateway_schema, operation, mode, rollout_service.headers())


@pytest.mark.parametrize("mode", MODES)
def test_fuzz_gateway_chat_completions(gateway_schema, rollout_service, mode):
    """The gateway's part of a chat request: ``model`` (``policy`` is rewritten) and ``n`` (1..max_n); the rest of
    the body is vLLM's contract, passed through, so each case gets a short valid conversation and max_tokens=2
    (every accepted body is a generation on CPU). The catch-all /v1/{path} is vLLM's router: not fuzzed."""
    headers = rollout_service.headers()
    strategy = gateway_schema["/v1/chat/completions"]["POST"].as_strategy(mode)

    @GATEWAY_FUZZ
    @given(case=strategy, policy=st.booleans())
    def run(case, policy: bool) -> None:
        if isinstance(case.body, dict):
            extra = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": False}
            case.body = {k: v for k, v in case.body.items() if k not in extra} | extra
            if policy or "model" not in case.body:
                case.body["model"] = "policy"
        response = case.call(headers=headers, timeout=120)
        assert response.status_code < 500, f"{case.body!r}: {response.text}"
        assert_openai_error(response)
        if response.status_code == 200:
            assert len(response.json()["choices"]) == (case.body.get("n") or 1)
            assert ("x-grace-adapter-version" in response.headers) == (case.body["model"] == "policy")

    run()


def test_gateway_survives_fuzzing(rollout_service):
    assert httpx.get(f"{rollout_service.base_url}/health", timeout=30).status_code == 200


# ----------------------------------------------------------------------------------------------- the schemas


def _apps(key: str | None):
    from services.judge.app import create_app as judge_app
    from services.judge.config import JudgeSettings
    from services.reward.app import create_app as reward_app
    from services.reward.config import RewardSettings
    from services.rollout.config import RolloutSettings
    from services.rollout.gateway import create_app as gateway_app
    from services.rollout.registry import AdapterRegistry

    reward = reward_app(RewardSettings(worker=False, api_key=key, max_groups=3, max_responses=4, max_response_chars=600))
    judge = judge_app(JudgeSettings(server_api_key=key, max_input_chars=700, max_batch_items=5))
    gateway = gateway_app(RolloutSettings(api_key=key, max_n=9), AdapterRegistry("base"), "http://127.0.0.1:9")
    return {"reward": reward.openapi(), "judge": judge.openapi(), "gateway": gateway.openapi()}


@pytest.mark.parametrize("key", [None, "k"])
def test_schemas_declare_auth_only_with_a_key(key):
    for name, schema in _apps(key).items():
        for path, methods in schema["paths"].items():
            for method, op in methods.items():
                params = [p["name"].lower() for p in op.get("parameters", [])]
                assert "authorization" not in params, (name, method, path)
                assert bool(op.get("security")) == ("401" in op["responses"]), (name, method, path)
                if key is None:
                    assert "security" not in op, (name, method, path)
        if key is not None:
            assert "HTTPBearer" in schema["components"]["securitySchemes"], name


@pytest.mark.parametrize("name, operation, codes", [
    ("reward", "POST /v1/score", {"400", "401", "413", "422", "503"}),
    ("reward", "POST /v1/calibrate", {"400", "401", "413", "422"}),
    ("reward", "POST /get_reward", {"400", "401", "413", "422", "503"}),
    ("judge", "POST /v1/judge", {"400", "401", "413", "422", "502"}),
    ("judge", "POST /v1/judge/batch", {"400", "401", "413", "422"}),
    ("gateway", "GET /v1/models", {"401", "503"}),
    ("gateway", "POST /v1/chat/completions", {"400", "401", "404", "413", "429", "502"}),
])  # fmt: skip
def test_schemas_document_errors_in_openai_shape(name, operation, codes):
    schema = _apps("k")[name]
    method, path = operation.split(" ", 1)
    responses = schema["paths"][path][method.lower()]["responses"]
    assert codes <= set(responses)
    for code in codes:
        assert responses[code]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
    error = schema["components"]["schemas"]["ErrorDetail"]
    assert set(error["properties"]) == {"message", "type", "param", "code"}


def test_schemas_carry_the_configured_limits_and_metrics_is_text():
    apps = _apps(None)
    components = apps["reward"]["components"]["schemas"]
    assert components["ScoreRequest"]["properties"]["groups"]["maxItems"] == 3
    assert components["CalibrateRequest"]["properties"]["groups"]["maxItems"] == 3
    responses = components["ScoreGroup"]["properties"]["responses"]
    assert responses["maxItems"] == 4 and responses["items"]["maxLength"] == 600
    assert components["CalibrateGroup"]["properties"]["responses"]["maxItems"] == 4
    judge = apps["judge"]["components"]["schemas"]
    assert judge["JudgeRequest"]["properties"]["response"]["maxLength"] == 700
    assert judge["JudgeBatchRequest"]["properties"]["items"]["maxItems"] == 5
    chat = apps["gateway"]["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert chat["properties"]["n"]["maximum"] == 9
    metrics = apps["reward"]["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert set(metrics) == {"text/plain"}
