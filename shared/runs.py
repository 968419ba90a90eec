"""Run-wide configuration shared through Redis, so every service agrees on it.

``grace run`` writes it once per run id; the trainer reads the loss from it,
the rollout worker K and m. Stored as JSON at ``grace:run:<run_id>``.
"""

from __future__ import annotations

from typing import Literal

import redis
from pydantic import BaseModel, Field

LOSSES = ("grace_kto", "kto", "dpo", "orpo", "sft")


class RunConfig(BaseModel):
    run_id: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    iterations: int = Field(3, ge=1)
    queries_per_iteration: int = Field(8, ge=1, description="K")
    responses_per_query: int = Field(8, ge=2, description="m")
    loss: Literal["grace_kto", "kto", "dpo", "orpo", "sft"] = "grace_kto"
    offline: bool = False


def _key(run_id: str) -> str:
    return f"grace:run:{run_id}"


def save_run_config(client: redis.Redis, config: RunConfig) -> None:
    client.set(_key(config.run_id), config.model_dump_json())


def load_run_config(client: redis.Redis, run_id: str) -> RunConfig | None:
    raw = client.get(_key(run_id))
    return None if raw is None else RunConfig.model_validate_json(raw)
