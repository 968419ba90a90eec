"""Settings: one class per service on a common base.

Sources, highest priority first: constructor arguments, environment variables
with the service's prefix (``GRACE_REWARD_``, ``GRACE_ROLLOUT_``, ...), plain
``REDIS_URL`` for the Redis URL, then an optional YAML file named by
``GRACE_CONFIG`` whose ``common:`` section applies to every service and whose
``<service>:`` section (``reward:``, ``rollout:``, ...) to one.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from contextvars import ContextVar
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import Field, SecretStr, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from shared.rope import RopeConfig, RopeScope

# ``load_settings(cls, file)``: the YAML file for settings built in this context instead of $GRACE_CONFIG
_CONFIG_FILE: ContextVar[str | None] = ContextVar("grace_config_file", default=None)


def grace_home() -> Path:
    """Root for caches and run folders (``GRACE_HOME``, default ``~/.cache/grace``)."""
    return Path(os.environ.get("GRACE_HOME", Path.home() / ".cache" / "grace"))


def service_config(prefix: str) -> SettingsConfigDict:
    return SettingsConfigDict(env_prefix=prefix, extra="ignore", env_nested_delimiter="__")


class YamlSectionSource(PydanticBaseSettingsSource):
    """Reads ``common`` + one service section from the YAML file in ``GRACE_CONFIG``."""

    def __init__(self, settings_cls: type[BaseSettings], section: str):
        super().__init__(settings_cls)
        self.values: dict[str, Any] = {}
        self.common: dict[str, Any] = {}
        path = _CONFIG_FILE.get() or os.environ.get("GRACE_CONFIG")
        if not path:
            return
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"GRACE_CONFIG {path}: top level must be a mapping")
        for key in ("common", section):
            part = data.get(key) or {}
            if not isinstance(part, dict):
                raise ValueError(f"GRACE_CONFIG {path}: section {key!r} must be a mapping")
            self.values.update(part)
        self.common = dict(data.get("common") or {})

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self.values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in self.values.items() if k in {*self.settings_cls.model_fields, *self.settings_cls.renamed}}


class ServiceSettings(BaseSettings):
    """What every service shares: Redis, model paths, adapter store, API key.

    A service subclasses it with its own section and prefix::

        class RewardSettings(ServiceSettings):
            section: ClassVar[str] = "reward"
            model_config = service_config("GRACE_REWARD_")
    """

    section: ClassVar[str] = "common"
    model_config = service_config("GRACE_")
    # renamed settings, old -> new: the old name (argument, YAML key, env variable) works with a FutureWarning
    renamed: ClassVar[dict[str, str]] = {}

    redis_url: str | None = Field(
        default_factory=lambda: os.environ.get("REDIS_URL"),
        description="Redis URL; unset = start a private local redis-server",
    )
    policy_model: str | None = Field(None, description="policy / general model path (unset = the local set's policy)")
    model_preset: Literal["tiny", "small"] = Field(
        "tiny",
        description="local model set (built on first use) behind every model path left unset; set it in `common:` so "
        "the rollout serves, and the trainer and SFT train, the same base",
    )
    general_model: str | None = Field(
        None,
        description=(
            "general *base* model M_G of P = PPL_G - PPL_D (paper: Qwen2.5-7B base, not an instruct model), same "
            "tokenizer as the domain model: P must measure domain language against general language, not instruction "
            "tuning. Unset: the local set's base model (the policy before SFT) when policy_model is unset too, else "
            "policy_model itself, with a warning"
        ),
    )
    domain_model: str | None = Field(None, description="domain-adapted model M_D for perplexity")
    embedding_model: str | None = Field(None, description="BGE-M3 folder for relevance")
    heldout_queries: Path = Field(
        Path("data/test_queries.jsonl"),
        description="the held-out split: only evaluation draws queries from it; runs never train on its queries",
    )
    adapter_root: Path = Field(default_factory=lambda: grace_home() / "adapters", description="adapter store root")
    run_root: Path = Field(default_factory=lambda: Path("runs"), description="run folders live here")
    api_key: SecretStr | None = Field(None, description="bearer API key required by the HTTP API (unset = open)")
    # ---- one RoPE setting per run (paper 3.6): set these in ``common:`` so every service agrees
    yarn_factor: float = Field(4.0, gt=0, description="YaRN rope scaling factor (1 = off): served window = factor x native")
    native_window: int | None = Field(None, ge=1, description="the model's native context (unset = read from its config.json)")
    rope_scope: RopeScope = Field(
        "inference", description="inference: YaRN only in vLLM (paper 3.6); inference_and_training: the trainer and SFT too"
    )
    run_id: str = Field("default", description="run id tagged on every stream message")
    log_level: str = "INFO"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, cls.yaml_source(settings_cls), file_secret_settings)

    @classmethod
    def yaml_source(cls, settings_cls: type[BaseSettings]) -> YamlSectionSource:
        """The YAML part of the settings (a service may extend ``YamlSectionSource``)."""
        return YamlSectionSource(settings_cls, cls.section)

    @model_validator(mode="before")
    @classmethod
    def _accept_renamed(cls, data: Any) -> Any:
        prefix = (cls.model_config.get("env_prefix") or "").upper()
        for old, new in cls.renamed.items() if isinstance(data, dict) else ():
            value = data.pop(old, None) or os.environ.get(f"{prefix}{old.upper()}")
            if value is not None:
                warnings.warn(
                    f"{old} ({prefix}{old.upper()}) is deprecated: use {new} ({prefix}{new.upper()})", FutureWarning, stacklevel=2
                )
                data.setdefault(new, value)
        return data

    def api_key_value(self) -> str | None:
        return self.api_key.get_secret_value() if self.api_key else None

    def general_model_path(self) -> str | None:
        """M_G as configured: ``general_model``; unset, ``policy_model`` (warned once); None = use the local set's base."""
        if self.general_model or not self.policy_model:
            return self.general_model
        _warn_general_is_policy(self.policy_model, self.model_config.get("env_prefix") or "GRACE_")
        return self.policy_model

    def policy_path(self) -> str:
        """``policy_model``, else the local ``model_preset`` set's policy: the base the rollout serves and the
        trainer and SFT train on."""
        from shared.tiny_models import ensure_model_set

        return self.policy_model or str(ensure_model_set(self.model_preset).policy)

    def rope(self) -> RopeConfig:
        """This service's RoPE setting, as a run records it (``RunConfig.rope``) and services compare it."""
        return RopeConfig(yarn_factor=self.yarn_factor, native_window=self.native_window, scope=self.rope_scope)


@functools.cache
def _warn_general_is_policy(policy: str, env_prefix: str) -> None:
    logging.getLogger(__name__).warning(
        "event=general_model_is_policy policy_model=%s detail=general_model is unset, so M_G is the policy itself: "
        "P = PPL_G - PPL_D then measures the domain model against this (instruction-tuned) policy, not against "
        "general language; set general_model (%sGENERAL_MODEL) to a base model, e.g. Qwen/Qwen2.5-7B",
        policy, env_prefix,
    )  # fmt: skip


def load_settings(cls: type[ServiceSettings], config_file: str | Path | None = None, **overrides: Any):
    """``cls(**overrides)`` reading ``config_file`` instead of ``$GRACE_CONFIG``, without touching the environment."""
    if config_file is None:
        return cls(**overrides)
    token = _CONFIG_FILE.set(str(config_file))
    try:
        return cls(**overrides)
    finally:
        _CONFIG_FILE.reset(token)
