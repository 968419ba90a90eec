"""Rollout replicas announce themselves in Redis: one sorted set, replica name -> time of its last beat.

A replica beats about once a second while it serves (its adapter manager's loop); one whose beats stop
(killed, its pod gone) drops out of ``live_replicas`` after ``ttl_s``. The orchestrator waits for every
live replica to load a new adapter, so no replica samples the next iteration from the old one.
"""

from __future__ import annotations

import time

import redis

REPLICAS_KEY = "grace:rollout:replicas"
HEARTBEAT_TTL_S = 10.0


def beat(client: redis.Redis, replica: str, now: float | None = None) -> None:
    client.zadd(REPLICAS_KEY, {replica: time.time() if now is None else now})


def leave(client: redis.Redis, replica: str) -> None:
    """A clean stop: the replica leaves the set at once instead of after the TTL."""
    client.zrem(REPLICAS_KEY, replica)


def live_replicas(client: redis.Redis, ttl_s: float = HEARTBEAT_TTL_S, now: float | None = None) -> set[str]:
    """Replicas whose last beat is at most ``ttl_s`` old."""
    now = time.time() if now is None else now
    names = client.zrangebyscore(REPLICAS_KEY, now - ttl_s, "+inf")
    return {n.decode() if isinstance(n, bytes) else n for n in names}
