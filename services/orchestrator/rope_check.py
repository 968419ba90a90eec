"""The rollout side of "one RoPE setting per run" (paper 3.6).

Before sampling an iteration, the rollout worker asks the gateway which RoPE
setting its vLLM serves (``GET /admin/rope``) and refuses a run recorded with
another one (``RunConfig.rope``): responses sampled under other RoPE
frequencies than the trainer trains with would be scored and trained as if
they came from the same policy.
"""

from __future__ import annotations

import logging

import httpx

from shared.rope import RopeConfig, check_rope
from shared.runs import RunConfig

log = logging.getLogger(__name__)


async def served_rope(gateway_url: str, api_key: str | None, timeout: float = 10.0) -> RopeConfig | None:
    """The gateway's RoPE setting, or None when it does not say (not a GRACE gateway, or unreachable)."""
    base = gateway_url.rstrip("/")
    base = base[:-3] if base.endswith("/v1") else base
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with httpx.AsyncClient(timeout=timeout) as client:
            reply = await client.get(base + "/admin/rope", headers=headers)
        if reply.status_code == 200:
            return RopeConfig.model_validate(reply.json())
        log.warning("event=rope_unknown gateway=%s status=%d", base, reply.status_code)
    except (httpx.HTTPError, ValueError) as exc:
        log.warning("event=rope_unknown gateway=%s error=%s", base, exc)
    return None


async def check_run_rope(
    gateway_url: str, api_key: str | None, run_config: RunConfig | None, fallback: RopeConfig | None = None
) -> RopeConfig | None:
    """Raises ``RopeMismatch`` (naming both values) when the run's RoPE setting differs from the one the
    gateway serves; where the gateway does not report it, ``fallback`` (the worker's own settings) stands in.

    A run without a recorded setting (``rope=None``, recorded before runs carried it) is not checked.
    Returns the setting compared against (None when nothing was compared).
    """
    if run_config is None or run_config.rope is None:
        return None
    served = await served_rope(gateway_url, api_key) or fallback
    if served is None:
        return None
    try:
        check_rope(run_config.run_id, run_config.rope, served, "rollout service")
    except ValueError as exc:
        log.error("event=rope_mismatch run=%s service=rollout detail=%s", run_config.run_id, exc)
        raise
    return served
