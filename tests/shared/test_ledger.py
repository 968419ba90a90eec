"""The iteration ledger on a real Redis: counts, drops, and its lock (redis-py Lock)."""

from __future__ import annotations

import time
import uuid

from shared.ledger import IterationLedger, expected_counts


def _ledger(client, stage="test", iteration=0, run=None):
    return IterationLedger(client, stage, run or f"run-{uuid.uuid4().hex[:8]}", iteration)


def test_an_iteration_completes_when_stored_and_dropped_items_reach_the_expected_count(redis_client):
    ledger = _ledger(redis_client)
    assert ledger.expected() is None and not ledger.is_complete()
    ledger.put({"a": "1", "b": "2"})
    ledger.put({"a": "1"})  # a redelivery overwrites itself
    assert ledger.held(["a", "c"]) == {"a"} and ledger.arrived() == 2
    ledger.set_expected(4)
    assert not ledger.is_complete()
    ledger.drop("c", "dead-lettered: bad JSON")
    ledger.drop("a", "counted once even if also stored")
    assert ledger.arrived() == 3 and not ledger.is_complete()
    with redis_client.pipeline(transaction=True) as pipe:  # writes join a caller's transaction
        ledger.put({"d": "4"}, pipe)
        pipe.execute()
    assert ledger.is_complete() and ledger.dropped() == {"c": "dead-lettered: bad JSON", "a": "counted once even if also stored"}
    assert sorted(ledger.values()) == [b"1", b"2", b"4"]
    other = IterationLedger(redis_client, "test", ledger.run_id, 3)
    other.set_expected(7)
    assert expected_counts(redis_client, "test", ledger.run_id) == {0: 4, 3: 7}


def test_one_holder_at_a_time_and_an_expired_holder_cannot_release_its_successor(redis_client):
    ledger = _ledger(redis_client)
    first = ledger.lock(ttl_s=0.3)
    assert first is not None and ledger.lock(ttl_s=0.3) is None
    time.sleep(0.5)  # the first holder died: its lock expired
    second = ledger.lock(ttl_s=5)
    assert second is not None
    IterationLedger.release(first)  # token-checked: does not free the second holder's lock
    assert ledger.lock(ttl_s=5) is None
    IterationLedger.release(second)
    assert ledger.lock(ttl_s=5) is not None


def test_a_named_owner_retakes_its_own_lock_after_a_restart(redis_client):
    ledger = _ledger(redis_client)
    held = ledger.lock(ttl_s=30, owner="trainer-a")
    assert held is not None
    assert ledger.lock(ttl_s=30, owner="trainer-b") is None
    again = ledger.lock(ttl_s=30, owner="trainer-a")  # same consumer name after a restart: at once
    assert again is not None and redis_client.pttl(ledger.lock_key) > 25_000
    IterationLedger.release(again)
    assert ledger.lock(ttl_s=30, owner="trainer-b") is not None
