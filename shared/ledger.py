"""The iteration ledger: what one stage of one iteration expects, holds and dropped, in Redis.

Both stream consumers that gather a whole iteration before acting use it: the
reward worker (groups, before it calibrates the iteration as one dataset) and
the trainer (weighted samples, before it trains). Per stage, run and iteration
(``<p>`` = ``grace:<stage>:<run>``):

- ``<p>:expected``        hash iteration -> item count, from the previous stage's marker;
- ``<p>:<it>:items``      hash item id -> its JSON (a redelivered item overwrites itself);
- ``<p>:<it>:dropped``    hash item id -> why its entry was dead-lettered (it counts as
                          arrived, with nothing to use: the iteration goes on without it);
- ``<p>:<it>:lock``       who acts on the iteration now: redis-py's ``Lock`` (token-checked
                          release, ``reacquire``), so a dead holder's lock expires.

Writes take an optional pipeline, so a consumer can store an item and ack its
stream entry in one MULTI/EXEC.
"""

from __future__ import annotations

import redis
from redis.exceptions import LockError

from shared.streams import as_text


class IterationLedger:
    def __init__(self, client: redis.Redis, stage: str, run_id: str, iteration: int):
        self.client = client
        self.run_id = run_id
        self.iteration = iteration
        prefix = f"grace:{stage}:{run_id}"
        self.expected_key = f"{prefix}:expected"
        self.items_key = f"{prefix}:{iteration}:items"
        self.dropped_key = f"{prefix}:{iteration}:dropped"
        self.lock_key = f"{prefix}:{iteration}:lock"

    # ---- writes
    def set_expected(self, count: int, pipe: redis.client.Pipeline | None = None) -> None:
        (pipe or self.client).hset(self.expected_key, str(self.iteration), count)

    def put(self, items: dict[str, str], pipe: redis.client.Pipeline | None = None) -> None:
        if items:
            (pipe or self.client).hset(self.items_key, mapping=items)

    def drop(self, item_id: str, reason: str, pipe: redis.client.Pipeline | None = None) -> None:
        """An item that will never arrive (dead-lettered): the iteration completes without it."""
        (pipe or self.client).hset(self.dropped_key, item_id, reason)

    def expire(self, ttl_s: int) -> None:
        """Keeps the items for ``ttl_s`` (redeliveries still find them), then lets them go."""
        pipe = self.client.pipeline()
        for key in (self.items_key, self.dropped_key):
            pipe.expire(key, ttl_s)
        pipe.execute()

    # ---- reads
    def expected(self) -> int | None:
        value = self.client.hget(self.expected_key, str(self.iteration))
        return None if value is None else int(value)

    def held(self, item_ids: list[str]) -> set[str]:
        """Which of ``item_ids`` are stored."""
        if not item_ids:
            return set()
        found = self.client.hmget(self.items_key, item_ids)
        return {i for i, v in zip(item_ids, found) if v is not None}

    def values(self) -> list[bytes]:
        return list(self.client.hvals(self.items_key))

    def dropped(self) -> dict[str, str]:
        return {as_text(k): as_text(v) for k, v in self.client.hgetall(self.dropped_key).items()}

    def arrived(self) -> int:
        """Distinct item ids stored or dropped."""
        return len({as_text(k) for k in self.client.hkeys(self.items_key)} | set(self.dropped()))

    def is_complete(self) -> bool:
        expected = self.expected()
        return expected is not None and self.arrived() >= expected

    # ---- one actor per iteration
    def lock(self, ttl_s: float, owner: str | None = None) -> redis.lock.Lock | None:
        """The iteration's lock if this caller holds it now, else None (never blocks).

        With ``owner``, the lock's token is that name, so the same consumer retakes (and renews) a
        lock it held before a restart at once instead of waiting for it to expire.
        """
        lock = self.client.lock(self.lock_key, timeout=ttl_s, blocking=False, thread_local=False)
        if owner is not None:
            lock.local.token = owner.encode()
            if lock.owned():
                lock.reacquire()
                return lock
        return lock if lock.acquire(token=owner) else None

    @staticmethod
    def release(lock: redis.lock.Lock) -> None:
        """Releases a lock this caller holds; one that expired and was taken over is left alone."""
        try:
            lock.release()
        except LockError:
            pass


def expected_counts(client: redis.Redis, stage: str, run_id: str) -> dict[int, int]:
    """iteration -> expected count, for every iteration of a run that announced one."""
    return {int(k): int(v) for k, v in client.hgetall(f"grace:{stage}:{run_id}:expected").items()}
