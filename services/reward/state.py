"""Durable per-iteration state of the reward worker in Redis.

Keys, per run and iteration (``<p>`` = ``grace:reward:<run>``):

- ``<p>:expected``        hash iteration -> K, from IterationComplete(stage="rollout");
- ``<p>:<it>:groups``     hash group_id -> the group and its per-response metrics;
- ``<p>:<it>:dropped``    hash group_id -> why it was dead-lettered (it counts as done, with no samples);
- ``<p>:<it>:published``  set of sample ids already on the samples stream
                          (plus ``iteration_complete`` once the marker is out);
- ``<p>:<it>:lock``       finalization lock (SET NX PX, token-checked release).

Publishing is exactly-once: a Lua script adds the id to the published set
and XADDs the message in one atomic step, so a retry after a crash, or two
finalizers racing, can never publish a sample twice.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

import redis

from shared.schemas import Metrics, RolloutGroup, StreamPayload, encode_message
from shared.streams import as_text

MARKER_ID = "iteration_complete"

_PUBLISH_ONCE = """
local added = 0
for i = 1, #ARGV, 3 do
  if redis.call('SADD', KEYS[2], ARGV[i]) == 1 then
    redis.call('XADD', KEYS[1], '*', 'type', ARGV[i + 1], 'data', ARGV[i + 2])
    added = added + 1
  end
end
return added
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass
class ScoredGroup:
    group: RolloutGroup
    metrics: list[Metrics | None]

    def to_json(self) -> str:
        return json.dumps(
            {"group": self.group.model_dump(mode="json"), "metrics": [m.model_dump() if m else None for m in self.metrics]}
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> ScoredGroup:
        data = json.loads(raw)
        return cls(RolloutGroup.model_validate(data["group"]), [Metrics(**m) if m else None for m in data["metrics"]])


class IterationState:
    def __init__(self, client: redis.Redis, run_id: str, iteration: int, ttl_s: int = 7 * 86400):
        self.client = client
        self.run_id = run_id
        self.iteration = iteration
        self.ttl_s = ttl_s
        prefix = f"grace:reward:{run_id}"
        self.expected_key = f"{prefix}:expected"
        self.groups_key = f"{prefix}:{iteration}:groups"
        self.dropped_key = f"{prefix}:{iteration}:dropped"
        self.published_key = f"{prefix}:{iteration}:published"
        self.lock_key = f"{prefix}:{iteration}:lock"
        self._publish = client.register_script(_PUBLISH_ONCE)
        self._release = client.register_script(_RELEASE)

    # -- scores
    def scored_ids(self, group_ids: list[str]) -> set[str]:
        if not group_ids:
            return set()
        found = self.client.hmget(self.groups_key, group_ids)
        return {g for g, v in zip(group_ids, found) if v is not None}

    def save(self, scored: list[ScoredGroup]) -> None:
        if scored:
            self.client.hset(self.groups_key, mapping={s.group.group_id: s.to_json() for s in scored})

    def scored_count(self) -> int:
        return int(self.client.hlen(self.groups_key))

    def drop(self, group_id: str, reason: str) -> None:
        """A group that will never be scored (dead-lettered): the iteration finalizes without it."""
        self.client.hset(self.dropped_key, group_id, reason)

    def dropped(self) -> dict[str, str]:
        return {as_text(k): as_text(v) for k, v in self.client.hgetall(self.dropped_key).items()}

    def done_count(self) -> int:
        """Groups scored or dropped."""
        return len({as_text(k) for k in self.client.hkeys(self.groups_key)} | set(self.dropped()))

    def load_all(self) -> list[ScoredGroup]:
        groups = [ScoredGroup.from_json(v) for v in self.client.hvals(self.groups_key)]
        return sorted(groups, key=lambda s: (s.group.group_index, s.group.group_id))

    # -- expected count
    def set_expected(self, count: int) -> None:
        self.client.hset(self.expected_key, str(self.iteration), count)

    def expected(self) -> int | None:
        value = self.client.hget(self.expected_key, str(self.iteration))
        return None if value is None else int(value)

    def is_complete(self) -> bool:
        expected = self.expected()
        return expected is not None and self.done_count() >= expected

    def is_finalized(self) -> bool:
        return bool(self.client.sismember(self.published_key, MARKER_ID))

    # -- publishing
    def publish_once(self, stream: str, items: list[tuple[str, StreamPayload]], chunk: int = 256) -> int:
        """Publishes each (id, payload) whose id was never published; returns how many were new."""
        added = 0
        for lo in range(0, len(items), chunk):
            args: list[str] = []
            for item_id, payload in items[lo : lo + chunk]:
                fields = encode_message(payload)
                args += [item_id, fields["type"], fields["data"]]
            added += int(self._publish(keys=[stream, self.published_key], args=args))
        return added

    def expire(self) -> None:
        """Keeps the finalized iteration's state for ``ttl_s`` (redeliveries still find it), then lets it go."""
        pipe = self.client.pipeline()
        for key in (self.groups_key, self.published_key, self.dropped_key):
            pipe.expire(key, self.ttl_s)
        pipe.execute()

    # -- lock
    def acquire(self, ttl_ms: int) -> str | None:
        token = uuid.uuid4().hex
        return token if self.client.set(self.lock_key, token, nx=True, px=ttl_ms) else None

    def release(self, token: str) -> None:
        self._release(keys=[self.lock_key], args=[token])
