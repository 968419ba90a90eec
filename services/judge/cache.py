"""The judgment cache: parsed verdicts in Redis, so judging the same thing again costs nothing.

The key is a SHA-256 of everything that decides a judgment: the judge model, the rendered prompt (which
holds the template, the instruction, the response or responses and the reference answer) and the sampling
parameters. Only parsed verdicts are stored: an unparsed answer is asked again next time. The cache is a
speed-up, never a failure: a Redis error counts as a miss and is logged.

Enable it only for a fixed judge model: a served name whose weights change (the rollout service's
``policy``, which hot-swaps adapters) would return judgments of the old weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

KEY_PREFIX = "grace:judge:cache:"


def judgment_key(parts: Mapping) -> str:
    """A stable hash of ``parts`` (JSON with sorted keys, so dict order does not matter)."""
    canonical = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class JudgmentCache:
    """One Redis; ``hits``, ``misses`` and ``errors`` count this process's lookups and writes."""

    def __init__(self, url: str, ttl_s: int = 0):
        self._redis = aioredis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self.ttl_s = ttl_s
        self.hits = self.misses = self.errors = 0

    async def get(self, key: str) -> str | None:
        try:
            value = await self._redis.get(KEY_PREFIX + key)
        except RedisError as exc:
            self.errors += 1
            log.warning("event=judge_cache_error op=get error=%r", str(exc)[:200])
            value = None
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        return value.decode("utf-8")

    async def put(self, key: str, value: str) -> None:
        try:
            await self._redis.set(KEY_PREFIX + key, value, ex=self.ttl_s or None)
        except RedisError as exc:
            self.errors += 1
            log.warning("event=judge_cache_error op=set error=%r", str(exc)[:200])

    def counters(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "errors": self.errors}

    async def close(self) -> None:
        await self._redis.aclose()
