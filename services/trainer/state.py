"""The trainer's durable bookkeeping in Redis.

Each iteration's samples, expected count, dropped samples and lock live in
the shared ``IterationLedger`` (stage ``trainer``): items = sample id ->
WeightedSample JSON (a redelivered sample overwrites itself: duplicates
collapse by id); the lock's token is the consumer name, so a dead trainer's
iteration is taken over after ``lock_ttl_s`` and the same consumer retakes it
at once after a restart. The trainer's own keys (``<run>`` = the run id):

- ``grace:trainer:runs``: set of run ids seen;
- ``grace:trainer:<run>:done``: hash iteration -> JSON record of the trained adapter;
- ``grace:trainer:<run>:published``: set of adapter versions whose event was published.

A stream entry is acked in the same MULTI/EXEC transaction that stores it,
so a crash either keeps both or neither.
"""

from __future__ import annotations

import json
from typing import Any

import redis

from shared.ledger import IterationLedger, expected_counts
from shared.schemas import IterationComplete, WeightedSample
from shared.streams import as_text

RUNS_KEY = "grace:trainer:runs"
STAGE = "trainer"


class TrainerState:
    def __init__(self, client: redis.Redis):
        self.client = client

    @staticmethod
    def _key(run_id: str, name: str) -> str:
        return f"grace:trainer:{run_id}:{name}"

    def ledger(self, run_id: str, iteration: int) -> IterationLedger:
        return IterationLedger(self.client, STAGE, run_id, iteration)

    # ---- ingestion (store + ack atomically)

    def store_sample(self, sample: WeightedSample, ack: tuple[str, str, str] | None = None) -> None:
        """Stores one sample; ``ack`` = (stream, group, entry id) acked in the same transaction."""
        pipe = self.client.pipeline(transaction=True)
        pipe.sadd(RUNS_KEY, sample.run_id)
        self.ledger(sample.run_id, sample.iteration).put({sample.sample_id: sample.model_dump_json()}, pipe)
        if ack:
            pipe.xack(*ack)
        pipe.execute()

    def store_complete(self, marker: IterationComplete, ack: tuple[str, str, str] | None = None) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.sadd(RUNS_KEY, marker.run_id)
        self.ledger(marker.run_id, marker.iteration).set_expected(marker.count, pipe)
        if ack:
            pipe.xack(*ack)
        pipe.execute()

    def drop_sample(self, run_id: str, iteration: int, sample_id: str, reason: str) -> None:
        """Records a sample whose stream entry is being dead-lettered, so its iteration does not wait for it."""
        pipe = self.client.pipeline(transaction=True)
        pipe.sadd(RUNS_KEY, run_id)
        self.ledger(run_id, iteration).drop(sample_id, reason, pipe)
        pipe.execute()

    # ---- reads

    def runs(self) -> list[str]:
        return sorted(as_text(r) for r in self.client.smembers(RUNS_KEY))

    def expected(self, run_id: str) -> dict[int, int]:
        return expected_counts(self.client, STAGE, run_id)

    def dropped(self, run_id: str, iteration: int) -> dict[str, str]:
        return self.ledger(run_id, iteration).dropped()

    def samples(self, run_id: str, iteration: int) -> list[WeightedSample]:
        """The iteration's samples, sorted by sample id (a fixed order for a seeded epoch)."""
        samples = [WeightedSample.model_validate_json(v) for v in self.ledger(run_id, iteration).values()]
        return sorted(samples, key=lambda s: s.sample_id)

    def done(self, run_id: str) -> dict[int, dict[str, Any]]:
        return {int(k): json.loads(v) for k, v in self.client.hgetall(self._key(run_id, "done")).items()}

    def next_iteration(self, run_id: str) -> tuple[int, int, int] | None:
        """(iteration, expected, arrived) of the run's first untrained iteration with a known count, or None;
        ``arrived`` counts dropped samples too."""
        done = self.done(run_id)
        expected = self.expected(run_id)
        pending = sorted(i for i in expected if i not in done)
        if not pending:
            return None
        iteration = pending[0]
        return iteration, expected[iteration], self.ledger(run_id, iteration).arrived()

    # ---- one trainer per iteration

    def acquire(self, run_id: str, iteration: int, owner: str, ttl_s: int) -> redis.lock.Lock | None:
        return self.ledger(run_id, iteration).lock(ttl_s, owner=owner)

    def release(self, lock: redis.lock.Lock) -> None:
        IterationLedger.release(lock)

    # ---- completion

    def is_published(self, run_id: str, version: str) -> bool:
        return bool(self.client.sismember(self._key(run_id, "published"), version))

    def mark_published(self, run_id: str, version: str) -> None:
        self.client.sadd(self._key(run_id, "published"), version)

    def mark_done(self, run_id: str, iteration: int, record: dict[str, Any]) -> None:
        self.client.hset(self._key(run_id, "done"), str(iteration), json.dumps(record))
