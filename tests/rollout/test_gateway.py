"""The rollout service through the official `openai` client: models, n > 1, streaming, YaRN window, limits."""

import httpx
import openai
import pytest
from transformers import AutoTokenizer


@pytest.fixture(scope="module")
def client(rollout_service):
    with openai.OpenAI(base_url=rollout_service.openai_base_url, api_key=rollout_service.api_key, timeout=120) as c:
        yield c


def test_health_is_open_and_reports_the_version(rollout_service):
    reply = httpx.get(rollout_service.base_url + "/health", timeout=10)
    assert reply.status_code == 200 and reply.json()["status"] == "ok" and reply.json()["policy"]


def test_models_list_includes_policy_and_the_base(client, rollout_service):
    models = {m.id: m for m in client.models.list().data}
    assert "policy" in models and "base" in models
    current = rollout_service.admin()["current"]
    assert models["policy"].model_extra["root"] == current["model"]
    assert models["policy"].model_extra["max_model_len"] == 8192  # YaRN: 4 x the native 2048


def test_bearer_key_is_required(rollout_service):
    with openai.OpenAI(base_url=rollout_service.openai_base_url, api_key="wrong", max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
    reply = httpx.get(rollout_service.base_url + "/admin/adapters", timeout=10)
    assert reply.status_code == 401 and reply.json()["error"]["type"] == "authentication_error"


def test_chat_with_n_responses(client):
    raw = client.chat.completions.with_raw_response.create(
        model="policy", messages=[{"role": "user", "content": "Write a report on grid storage."}],
        n=3, max_tokens=16, temperature=1.0, top_p=0.95, seed=1,
    )  # fmt: skip
    reply = raw.parse()
    assert sorted(c.index for c in reply.choices) == [0, 1, 2]
    assert reply.usage.completion_tokens > 0
    assert raw.headers["x-grace-adapter-version"] and raw.headers["x-grace-model"] == reply.model


def test_text_completion_with_n_responses(client):
    reply = client.completions.create(model="policy", prompt="The annual report", n=4, max_tokens=8, seed=3)
    assert sorted(c.index for c in reply.choices) == [0, 1, 2, 3]
    assert len({c.text for c in reply.choices}) > 1  # seeded per choice, not four copies


def test_streaming_passes_server_sent_events_through(client):
    stream = client.chat.completions.create(
        model="policy", messages=[{"role": "user", "content": "Outline a policy memo."}], n=2, max_tokens=12, stream=True
    )
    texts, finished = {0: "", 1: ""}, set()
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1} and all(texts.values())


def test_prompt_longer_than_the_native_window(client, rollout_service):
    tokenizer = AutoTokenizer.from_pretrained(rollout_service.policy_model)
    words = "the state owned enterprise reform report covers governance capital and energy".split()
    prompt = " ".join(words[i % len(words)] for i in range(3000))
    n_tokens = len(tokenizer(prompt)["input_ids"])
    assert 2048 < n_tokens < 8000
    reply = client.completions.create(model="policy", prompt=prompt, max_tokens=8, temperature=0)
    assert reply.usage.prompt_tokens > 2048 and reply.choices[0].finish_reason in ("length", "stop")
    too_long = " ".join(words[i % len(words)] for i in range(9000))
    with pytest.raises(openai.BadRequestError):  # beyond 4 x native: vLLM's limit holds
        client.completions.create(model="policy", prompt=too_long, max_tokens=8)


def test_limits_answer_4xx_with_the_field(rollout_service):
    headers = rollout_service.headers()
    url = rollout_service.openai_base_url
    reply = httpx.post(url + "/completions", headers=headers, json={"model": "policy", "prompt": "x", "n": 17}, timeout=30)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "n"
    reply = httpx.post(url + "/completions", headers=headers, json={"model": "policy", "prompt": "x" * 1_100_000}, timeout=30)
    assert reply.status_code == 413 and "max_body_bytes" in reply.json()["error"]["message"]
    reply = httpx.post(url + "/load_lora_adapter", headers=headers, json={"lora_name": "x", "lora_path": "/tmp"}, timeout=30)
    assert reply.status_code == 404 and reply.json()["error"]["type"] == "not_found_error"  # vLLM's admin route: hidden


def test_many_seeded_long_prompts_at_once(rollout_service):
    """The rollout pattern (many queries in flight, n > 1, seeded) past vLLM's per-step token budget."""
    import asyncio

    async def run():
        async with openai.AsyncOpenAI(base_url=rollout_service.openai_base_url, api_key=rollout_service.api_key,
                                      timeout=300, max_retries=0) as client:  # fmt: skip
            prompts = [f"Request {i}: " + "write the governance section of the annual energy report. " * 40 for i in range(12)]
            replies = await asyncio.gather(*(
                client.completions.create(model="policy", prompt=p, n=3, max_tokens=4, seed=i) for i, p in enumerate(prompts)
            ))  # fmt: skip
            return replies

    replies = asyncio.run(run())
    assert sum(r.usage.prompt_tokens for r in replies) > 2048
    assert all(len(r.choices) == 3 for r in replies)


def test_other_model_names_pass_through(client):
    reply = client.completions.create(model="base", prompt="Summary", max_tokens=4)
    assert reply.model == "base"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="Summary", max_tokens=4)


def test_rope_endpoint_reports_the_served_setting_and_runs_are_checked_against_it(rollout_service):
    """One RoPE setting per run (paper 3.6): the gateway reports what vLLM serves; a run with other values is refused."""
    import asyncio

    from services.orchestrator.rope_check import check_run_rope
    from shared.rope import RopeConfig, RopeMismatch
    from shared.runs import RunConfig

    assert httpx.get(rollout_service.base_url + "/admin/rope", timeout=10).status_code == 401
    reply = httpx.get(rollout_service.base_url + "/admin/rope", headers=rollout_service.headers(), timeout=10)
    body = reply.json()
    assert reply.status_code == 200 and body["replica"] == rollout_service.replica
    assert RopeConfig.model_validate(body) == RopeConfig(yarn_factor=4.0, native_window=None, scope="inference")

    url, key = rollout_service.openai_base_url, rollout_service.api_key
    same = RunConfig(run_id="rope-ok", rope=RopeConfig())
    assert asyncio.run(check_run_rope(url, key, same)) == RopeConfig()
    assert asyncio.run(check_run_rope(url, key, RunConfig(run_id="old"))) is None  # recorded before rope: unchecked
    other = RunConfig(run_id="rope-off", rope=RopeConfig(yarn_factor=1.0))
    with pytest.raises(
        RopeMismatch, match="run rope-off asks for yarn_factor=1.0 but the rollout service is set to yarn_factor=4.0"
    ):
        asyncio.run(check_run_rope(url, key, other))
    # an endpoint that does not report it (plain vLLM: 404): the worker's own setting stands in, if given
    assert asyncio.run(check_run_rope(rollout_service.vllm_url, None, other)) is None
    with pytest.raises(RopeMismatch):
        asyncio.run(check_run_rope(rollout_service.vllm_url, None, other, fallback=RopeConfig()))
