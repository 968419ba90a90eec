"""Judge service settings (env prefix ``GRACE_JUDGE_``, YAML section ``judge:``).

The backend is any OpenAI-compatible chat endpoint: GPT-4o as in the paper
(``GRACE_JUDGE_BASE_URL=https://api.openai.com/v1``, ``GRACE_JUDGE_MODEL=gpt-4o``,
``GRACE_JUDGE_API_KEY=sk-...``) or a vLLM server (the project's rollout
service or a dedicated judge model).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings

from shared.settings import ServiceSettings, YamlSectionSource, service_config


class JudgeYamlSource(YamlSectionSource):
    """The YAML source with one addition: ``common.api_key`` (the key every service's API requires)
    also protects the judge's API (``server_api_key``). It stays the backend key too unless
    ``judge.api_key`` names another, which is right for the default backend, the rollout service."""

    def __init__(self, settings_cls: type[BaseSettings]):
        super().__init__(settings_cls, "judge")
        if "api_key" in self.common:
            self.values.setdefault("server_api_key", self.common["api_key"])


class JudgeSettings(ServiceSettings):
    section: ClassVar[str] = "judge"
    model_config = service_config("GRACE_JUDGE_")

    host: str = Field("127.0.0.1", description="bind address of `grace serve judge`")
    port: int = Field(8200, description="port of `grace serve judge`")
    max_body_bytes: int = Field(8 << 20, ge=1024, description="largest request body accepted (413 above)")

    # Backend. `api_key` here is the *backend's* key (GRACE_JUDGE_API_KEY, e.g. an OpenAI key);
    # the key that protects this service's own HTTP API is `server_api_key`.
    base_url: str = Field("http://127.0.0.1:8000/v1", description="OpenAI-compatible base URL of the judge model")
    model: str = Field("policy", description="judge model name at the backend (gpt-4o in the paper)")
    api_key: SecretStr | None = Field(None, description="backend API key (GRACE_JUDGE_API_KEY); unset = 'EMPTY'")
    server_api_key: SecretStr | None = Field(None, description="bearer key required by /v1/judge (unset = open)")

    structured_output: Literal["json_schema", "json_object", "none"] = Field(
        "json_schema",
        description="response_format sent to the backend; a backend that rejects it is asked again without",
    )
    analysis_max_chars: int = Field(2000, ge=0, description="maxLength of the analysis in the JSON schema (0 = no limit)")
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    frequency_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="OpenAI frequency_penalty (a weak judge model may loop on whitespace in JSON)"
    )
    max_tokens: int = Field(1024, ge=16, description="completion budget of one judgement")

    timeout_s: float = Field(120.0, gt=0, description="per backend request")
    max_retries: int = Field(
        4,
        ge=0,
        description="transport retries (429, 5xx, timeouts, lost connections), the openai SDK's own policy: "
        "exponential backoff from 0.5 s, a Retry-After of up to 120 s honoured",
    )
    parse_retries: int = Field(2, ge=0, description="answers asked again when one holds no verdict; after them the score is null")
    max_concurrency: int = Field(8, ge=1, description="backend requests in flight at once (per process)")

    cache_url: str | None = Field(
        None, description="Redis URL of the judgment cache (unset = no cache); use it with a fixed judge model"
    )
    cache_ttl_s: int = Field(0, ge=0, description="lifetime of a cached judgment in seconds (0 = no expiry)")
    prompt_price_per_1m: float = Field(0.0, ge=0, description="price of 1M prompt tokens, for usage.cost (gpt-4o: 2.5 USD)")
    completion_price_per_1m: float = Field(
        0.0, ge=0, description="price of 1M completion tokens, for usage.cost (gpt-4o: 10 USD)"
    )

    max_input_chars: int = Field(400_000, ge=1, description="longest instruction or response accepted (422 above)")
    max_batch_items: int = Field(256, ge=1, description="largest /v1/judge/batch (422 above)")

    @classmethod
    def yaml_source(cls, settings_cls: type[BaseSettings]) -> YamlSectionSource:
        return JudgeYamlSource(settings_cls)

    def backend_api_key(self) -> str:
        return self.api_key.get_secret_value() if self.api_key else "EMPTY"

    def server_api_key_value(self) -> str | None:
        return self.server_api_key.get_secret_value() if self.server_api_key else None

    def api_key_value(self) -> str | None:
        """The key *this* service requires (the base class's meaning), never the backend's key."""
        return self.server_api_key_value()
