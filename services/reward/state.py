"""Durable per-iteration state of the reward worker in Redis.

The iteration's groups, their expected count, the dropped ones and the
finalization lock live in the shared ``IterationLedger`` (stage ``reward``):
items = group id -> the group and its per-response metrics. Only what is the
reward worker's own is here: ``grace:reward:<run>:<it>:published``, the set of
sample ids already on the samples stream (plus ``iteration_complete`` once the
marker is out).

Publishing is exactly-once: a Lua script adds the id to the published set
and XADDs the message in one atomic step, so a retry after a crash, or two
finalizers racing, can never publish a sample twice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import redis

from shared.ledger import IterationLedger
from shared.schemas import Metrics, RolloutGroup, StreamPayload, encode_message

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
        self.ledger = IterationLedger(client, "reward", run_id, iteration)
        self.published_key = f"grace:reward:{run_id}:{iteration}:published"
        self._publish = client.register_script(_PUBLISH_ONCE)

    # -- scores
    def scored_ids(self, group_ids: list[str]) -> set[str]:
        return self.ledger.held(group_ids)

    def save(self, scored: list[ScoredGroup]) -> None:
        self.ledger.put({s.group.group_id: s.to_json() for s in scored})

    def drop(self, group_id: str, reason: str) -> None:
        """A group that will never be scored (dead-lettered): the iteration finalizes without it."""
        self.ledger.drop(group_id, reason)

    def dropped(self) -> dict[str, str]:
        return self.ledger.dropped()

    def load_all(self) -> list[ScoredGroup]:
        groups = [ScoredGroup.from_json(v) for v in self.ledger.values()]
        return sorted(groups, key=lambda s: (s.group.group_index, s.group.group_id))

    # -- expected count
    def set_expected(self, count: int) -> None:
        self.ledger.set_expected(count)

    def expected(self) -> int | None:
        return self.ledger.expected()

    def is_complete(self) -> bool:
        return self.ledger.is_complete()

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
        self.ledger.expire(self.ttl_s)
        self.client.expire(self.published_key, self.ttl_s)

    # -- lock
    def acquire(self, ttl_ms: int) -> redis.lock.Lock | None:
        return self.ledger.lock(ttl_ms / 1000)

    def release(self, lock: redis.lock.Lock) -> None:
        self.ledger.release(lock)
