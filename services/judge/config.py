"""Judge service settings (env prefix ``GRACE_JUDGE_``, YAML section ``judge:``).

The backend is any OpenAI-compatible chat endpoint: GPT-4o as in the paper
(``GRACE_JUDGE_BASE_URL=https://api.openai.com/v1``, ``GRACE_JUDGE_MODEL=gpt-4o``,
``GRACE_JUDGE_BACKEND_API_KEY=sk-...``) or a vLLM server (the project's rollout
service or a dedicated judge model).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, ClassVar, Literal

from pydantic import Field, SecretStr, model_validator

from shared.settings import ServiceSettings, YamlSectionSource, service_config

log = logging.getLogger(__name__)


class JudgeSettings(ServiceSettings):
    section: ClassVar[str] = "judge"
    model_config = service_config("GRACE_JUDGE_")

    host: str = Field("127.0.0.1", description="bind address of `grace serve judge`")
    port: int = Field(8200, description="port of `grace serve judge`")
    max_body_bytes: int = Field(8 << 20, ge=1024, description="largest request body accepted (413 above)")

    # Two keys: `backend_api_key` is the backend's (e.g. an OpenAI key); `api_key`, as on every service, is the one
    # /v1/judge requires: `server_api_key`, else `common: api_key` (also the default backend key: the rollout's).
    base_url: str = Field("http://127.0.0.1:8000/v1", description="OpenAI-compatible base URL of the judge model")
    model: str = Field("policy", description="judge model name at the backend (gpt-4o in the paper)")
    backend_api_key: SecretStr | None = Field(None, description="backend API key (unset = common api_key, else 'EMPTY')")
    server_api_key: SecretStr | None = Field(None, description="bearer key required by /v1/judge (unset = common api_key)")

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

    @model_validator(mode="before")
    @classmethod
    def _split_keys(cls, data: Any) -> Any:
        """GRACE_JUDGE_API_KEY, `judge: api_key`, `api_key=`: the backend's key, deprecated (`backend_api_key` wins)."""
        if not isinstance(data, dict):
            return data
        common = backend = YamlSectionSource(cls, "common").common.get("api_key")  # not an old name: see above
        if (old := data.pop("api_key", None)) is not None and old != common:
            ignored = " (ignored: backend_api_key is set)" if data.get("backend_api_key") is not None else ""
            message = "GRACE_JUDGE_API_KEY / `judge: api_key` (the backend's key) is deprecated: use "
            message += f"GRACE_JUDGE_BACKEND_API_KEY / `judge: backend_api_key`{ignored}"
            warnings.warn(message, DeprecationWarning, stacklevel=2)
            log.warning("event=judge_deprecated_setting detail=%s", message)
            backend = old
        data["backend_api_key"] = backend if data.get("backend_api_key") is None else data["backend_api_key"]
        data["api_key"] = data["server_api_key"] = common if data.get("server_api_key") is None else data["server_api_key"]
        return data

    def backend_api_key_value(self) -> str:
        return self.backend_api_key.get_secret_value() if self.backend_api_key else "EMPTY"
