"""Waiting on the streams for a stage of a run to finish (read-only: no consumer group).

The waits survive a Redis restart: while Redis is down they log, wait and retry until the stage
deadline; when a *different* redis-server answers (its ``run_id`` changed, see ``RedisEpoch``) they
call ``on_restart`` (the loop re-runs the iteration's rollout stage, which re-publishes, idempotently,
whatever the last second of the append-only file lost) and read the stream again from the start.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import redis

from shared.heartbeats import HEARTBEAT_TTL_S, live_replicas
from shared.schemas import STREAM_ADAPTERS, STREAM_SAMPLES, AdapterStatus, IterationComplete, StreamPayload, decode_message

log = logging.getLogger(__name__)


class StageTimeout(TimeoutError):
    pass


REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError)  # BusyLoadingError (AOF loading) is a ConnectionError
RETRY_S = 1.0


class RedisEpoch:
    """Which redis-server process answers: its ``run_id`` is new on every start.

    redis-py reconnects and retries a failed command by itself, so a restart between two reads can pass
    without any error reaching us; comparing ``run_id`` catches it anyway."""

    def __init__(self, client: redis.Redis):
        self.client = client
        self.run_id: str | None = None

    def restarted(self) -> bool:
        """True once per restart seen since the last call (never on the first call)."""
        run_id = self.client.info("server")["run_id"]
        changed = self.run_id is not None and run_id != self.run_id
        if changed:
            log.warning("event=redis_restarted before=%s now=%s", self.run_id, run_id)
        self.run_id = run_id
        return changed

    def cursor(self, last: str, on_restart: Callable[[], None] | None) -> str:
        """A wait's stream position: ``last``, or the start of the stream after a restart (``on_restart``
        called first: the loop re-publishes what the restart lost)."""
        if not self.restarted():
            return last
        if on_restart:
            on_restart()
        return "0-0"


def _redis_down(exc: Exception, deadline: float, timeout: float, what: str) -> None:
    """Logs, waits ``RETRY_S``, or raises StageTimeout once the stage deadline has passed."""
    if time.monotonic() > deadline:
        raise StageTimeout(f"timed out after {timeout:.0f}s waiting for {what}; Redis unreachable: {exc}") from exc
    log.warning("event=redis_unavailable waiting_for=%r error=%s", what, type(exc).__name__)
    time.sleep(RETRY_S)


def find_payload(
    client: redis.Redis, stream: str, match: Callable[[StreamPayload], bool], start: str = "0-0"
) -> tuple[StreamPayload | None, str]:
    """First payload on ``stream`` after ``start`` for which ``match`` is true, and the last id read."""
    last = start
    while True:
        rows = client.xrange(stream, min=f"({last}" if last != "0-0" else "-", count=500)
        if not rows:
            return None, last
        for entry_id, fields in rows:
            last = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            try:
                payload = decode_message(fields)
            except ValueError:
                continue
            if match(payload):
                return payload, last


def wait_for(
    client: redis.Redis,
    stream: str,
    match: Callable[[StreamPayload], bool],
    *,
    timeout: float,
    what: str,
    on_tick: Callable[[], None] | None = None,
    epoch: RedisEpoch | None = None,
    on_restart: Callable[[], None] | None = None,
) -> StreamPayload:
    deadline = time.monotonic() + timeout
    epoch = epoch or RedisEpoch(client)
    last = "0-0"
    while True:
        try:
            last = epoch.cursor(last, on_restart)
            payload, last = find_payload(client, stream, match, last)
            if payload is not None:
                return payload
            if time.monotonic() > deadline:
                raise StageTimeout(f"timed out after {timeout:.0f}s waiting for {what}")
            if on_tick:
                on_tick()
            client.xread({stream: last}, block=1000, count=1)
        except REDIS_DOWN as exc:
            _redis_down(exc, deadline, timeout, what)


def wait_for_samples(client: redis.Redis, run_id: str, iteration: int, timeout: float, **kw) -> IterationComplete:
    return wait_for(
        client,
        STREAM_SAMPLES,
        lambda p: isinstance(p, IterationComplete) and p.stage == "reward" and p.run_id == run_id and p.iteration == iteration,
        timeout=timeout,
        what=f"weighted samples of {run_id} iteration {iteration}",
        **kw,
    )


def wait_for_adapter(
    client: redis.Redis, run_id: str, version: str, timeout: float, *, ttl_s: float = HEARTBEAT_TTL_S, **kw
) -> AdapterStatus:
    """Until every live rollout replica (``shared.heartbeats``) reports ``version`` loaded, and at least one
    has; raises if one rejected it. A replica whose heartbeat stops while we wait leaves the set (logged),
    and is no longer waited for. With no heartbeats at all (replicas without Redis), the first status counts.
    Statuses seen before a Redis restart still count: what a replica loaded, it still serves."""
    deadline = time.monotonic() + timeout
    loaded: dict[str, AdapterStatus] = {}
    last, live = "0-0", set()
    on_tick, on_restart = kw.get("on_tick"), kw.get("on_restart")
    epoch = kw.get("epoch") or RedisEpoch(client)
    while True:
        try:
            last = epoch.cursor(last, on_restart)
            while True:
                status, last = find_payload(
                    client,
                    STREAM_ADAPTERS,
                    lambda p: isinstance(p, AdapterStatus) and p.run_id == run_id and p.version == version,
                    last,
                )
                if status is None:
                    break
                if status.status != "loaded":
                    raise RuntimeError(f"rollout replica {status.replica} rejected adapter {version}: {status.reason}")
                loaded.setdefault(status.replica, status)
            now_live = live_replicas(client, ttl_s)
            for gone in sorted(live - now_live):
                log.warning("event=replica_left replica=%s detail=no heartbeat for %.0fs; not waited for", gone, ttl_s)
            live = now_live
            if loaded and live <= loaded.keys():
                log.info("event=adapter_serving version=%s replicas=%s", version, ",".join(sorted(loaded)))
                return next(iter(loaded.values()))
            if time.monotonic() > deadline:
                missing = ", ".join(sorted(live - loaded.keys())) or "any replica"
                raise StageTimeout(f"timed out after {timeout:.0f}s waiting for {missing} to load adapter {version} of {run_id}")
            if on_tick:
                on_tick()
            client.xread({STREAM_ADAPTERS: last}, block=1000, count=1)
        except REDIS_DOWN as exc:
            _redis_down(exc, deadline, timeout, f"adapter {version} of {run_id}")
