"""The trainer's durable bookkeeping in Redis.

Keys (``<run>`` = the samples' run id):

- ``grace:trainer:runs``: set of run ids seen;
- ``grace:trainer:<run>:samples:<iteration>``: hash sample_id -> WeightedSample JSON
  (a redelivered sample overwrites itself: duplicates collapse by id);
- ``grace:trainer:<run>:dropped:<iteration>``: hash sample_id -> why its entry was dead-lettered
  (it counts toward the iteration's total, with nothing to train);
- ``grace:trainer:<run>:expected``: hash iteration -> count from IterationComplete(stage="reward");
- ``grace:trainer:<run>:done``: hash iteration -> JSON record of the trained adapter;
- ``grace:trainer:<run>:published``: set of adapter versions whose event was published;
- ``grace:trainer:<run>:lock:<iteration>``: the consumer training it (expires, so a dead
  trainer's iteration is taken over; the same consumer name retakes it at once after a restart).

A stream entry is acked in the same MULTI/EXEC transaction that stores it,
so a crash either keeps both or neither.
"""

from __future__ import annotations

import json
from typing import Any

import redis

from shared.schemas import IterationComplete, WeightedSample
from shared.streams import as_text

RUNS_KEY = "grace:trainer:runs"


class TrainerState:
    def __init__(self, client: redis.Redis):
        self.client = client

    @staticmethod
    def _key(run_id: str, name: str) -> str:
        return f"grace:trainer:{run_id}:{name}"

    # ---- ingestion (store + ack atomically)

    def store_sample(self, sample: WeightedSample, ack: tuple[str, str, str] | None = None) -> None:
        """Stores one sample; ``ack`` = (stream, group, entry id) acked in the same transaction."""
        pipe = self.client.pipeline(transaction=True)
        pipe.sadd(RUNS_KEY, sample.run_id)
        pipe.hset(self._key(sample.run_id, f"samples:{sample.iteration}"), sample.sample_id, sample.model_dump_json())
        if ack:
            pipe.xack(*ack)
        pipe.execute()

    def store_complete(self, marker: IterationComplete, ack: tuple[str, str, str] | None = None) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.sadd(RUNS_KEY, marker.run_id)
        pipe.hset(self._key(marker.run_id, "expected"), str(marker.iteration), marker.count)
        if ack:
            pipe.xack(*ack)
        pipe.execute()

    def drop_sample(self, run_id: str, iteration: int, sample_id: str, reason: str) -> None:
        """Records a sample whose stream entry is being dead-lettered, so its iteration does not wait for it."""
        pipe = self.client.pipeline(transaction=True)
        pipe.sadd(RUNS_KEY, run_id)
        pipe.hset(self._key(run_id, f"dropped:{iteration}"), sample_id, reason)
        pipe.execute()

    # ---- reads

    def runs(self) -> list[str]:
        return sorted(as_text(r) for r in self.client.smembers(RUNS_KEY))

    def expected(self, run_id: str) -> dict[int, int]:
        return {int(k): int(v) for k, v in self.client.hgetall(self._key(run_id, "expected")).items()}

    def sample_count(self, run_id: str, iteration: int) -> int:
        return int(self.client.hlen(self._key(run_id, f"samples:{iteration}")))

    def dropped(self, run_id: str, iteration: int) -> dict[str, str]:
        raw = self.client.hgetall(self._key(run_id, f"dropped:{iteration}"))
        return {as_text(k): as_text(v) for k, v in raw.items()}

    def accounted(self, run_id: str, iteration: int) -> int:
        """Distinct sample ids of the iteration that arrived: stored or dropped."""
        stored = {as_text(k) for k in self.client.hkeys(self._key(run_id, f"samples:{iteration}"))}
        return len(stored | set(self.dropped(run_id, iteration)))

    def samples(self, run_id: str, iteration: int) -> list[WeightedSample]:
        """The iteration's samples, sorted by sample id (a fixed order for a seeded epoch)."""
        raw = self.client.hgetall(self._key(run_id, f"samples:{iteration}"))
        samples = [WeightedSample.model_validate_json(v) for v in raw.values()]
        return sorted(samples, key=lambda s: s.sample_id)

    def done(self, run_id: str) -> dict[int, dict[str, Any]]:
        return {int(k): json.loads(v) for k, v in self.client.hgetall(self._key(run_id, "done")).items()}

    def next_iteration(self, run_id: str) -> tuple[int, int, int] | None:
        """(iteration, expected, arrived) of the run's first untrained iteration with a known count, or None;
        ``arrived`` counts dropped samples too."""
        done = self.done(run_id)
        pending = sorted(i for i in self.expected(run_id) if i not in done)
        if not pending:
            return None
        iteration = pending[0]
        return iteration, self.expected(run_id)[iteration], self.accounted(run_id, iteration)

    # ---- one trainer per iteration

    def acquire(self, run_id: str, iteration: int, owner: str, ttl_s: int) -> bool:
        key = self._key(run_id, f"lock:{iteration}")
        if self.client.set(key, owner, nx=True, ex=ttl_s):
            return True
        if as_text(self.client.get(key) or b"") == owner:
            self.client.expire(key, ttl_s)
            return True
        return False

    def release(self, run_id: str, iteration: int, owner: str) -> None:
        key = self._key(run_id, f"lock:{iteration}")
        if as_text(self.client.get(key) or b"") == owner:
            self.client.delete(key)

    # ---- completion

    def is_published(self, run_id: str, version: str) -> bool:
        return bool(self.client.sismember(self._key(run_id, "published"), version))

    def mark_published(self, run_id: str, version: str) -> None:
        self.client.sadd(self._key(run_id, "published"), version)

    def mark_done(self, run_id: str, iteration: int, record: dict[str, Any]) -> None:
        self.client.hset(self._key(run_id, "done"), str(iteration), json.dumps(record))
