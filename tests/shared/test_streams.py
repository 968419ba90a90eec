"""Stream helpers against a real Redis server."""

import json
import multiprocessing
import os
import signal
import time

import pytest
import redis

from shared.schemas import STREAM_ROLLOUTS, RolloutGroup, WeightedSample, entry_identity
from shared.streams import StreamConsumer, prune_idle_groups, publish


def _group(i: int) -> RolloutGroup:
    return RolloutGroup(run_id="r", iteration=0, group_id=f"r:0:{i}", group_index=i, query=f"q{i}", responses=["a", "b"])


def test_publish_consume_ack(redis_client):
    ids = [publish(redis_client, STREAM_ROLLOUTS, _group(i)) for i in range(3)]
    consumer = StreamConsumer(redis_client, STREAM_ROLLOUTS, "reward", "c1")
    entries = consumer.read(count=10, block_ms=100)
    assert [e.id for e in entries] == ids
    assert [e.payload.group_id for e in entries] == ["r:0:0", "r:0:1", "r:0:2"]
    assert all(e.deliveries == 1 for e in entries)
    assert consumer.ack(*ids) == 3
    assert redis_client.xpending(STREAM_ROLLOUTS, "reward")["pending"] == 0
    assert consumer.read(count=10, block_ms=50) == []


def test_groups_fan_out_and_consumers_share(redis_client):
    publish(redis_client, STREAM_ROLLOUTS, _group(0))
    publish(redis_client, STREAM_ROLLOUTS, _group(1))
    a = StreamConsumer(redis_client, STREAM_ROLLOUTS, "g1", "a")
    b = StreamConsumer(redis_client, STREAM_ROLLOUTS, "g1", "b")
    other = StreamConsumer(redis_client, STREAM_ROLLOUTS, "g2", "x")
    got_a = a.read(count=1, block_ms=50)
    got_b = b.read(count=1, block_ms=50)
    assert {e.payload.group_id for e in got_a + got_b} == {"r:0:0", "r:0:1"}  # shared within a group
    assert len(other.read(count=10, block_ms=50)) == 2  # every group sees everything


def test_restarted_consumer_rereads_its_own_pending(redis_client):
    publish(redis_client, STREAM_ROLLOUTS, _group(0))
    first = StreamConsumer(redis_client, STREAM_ROLLOUTS, "reward", "worker-1")
    (entry,) = first.read(block_ms=50)
    restarted = StreamConsumer(redis_client, STREAM_ROLLOUTS, "reward", "worker-1")
    (again,) = restarted.read(block_ms=50)
    assert again.id == entry.id and again.deliveries == 2


def test_after_a_lost_connection_the_consumer_rereads_its_own_pending(redis_client, monkeypatch):
    """An ack lost in a Redis outage: the entry is still pending on this consumer, and the next read after the
    connection error hands it out again at once, not after the idle reclaim (60 s here)."""
    publish(redis_client, STREAM_ROLLOUTS, _group(0))
    consumer = StreamConsumer(redis_client, STREAM_ROLLOUTS, "reward", "worker-1")
    (entry,) = consumer.read(block_ms=50)  # delivered; its ack never reaches the server
    real = redis_client.xreadgroup
    calls = []

    def outage_once(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise redis.ConnectionError("Connection refused")
        return real(*args, **kwargs)

    monkeypatch.setattr(redis_client, "xreadgroup", outage_once)
    with pytest.raises(redis.ConnectionError):
        consumer.read(block_ms=50)
    (again,) = consumer.read(block_ms=50)
    assert again.id == entry.id and again.deliveries == 2
    assert consumer.ack(again.id) == 1 and consumer.read(block_ms=50) == []


def _consume_without_ack(url: str, ready) -> None:
    client = redis.Redis.from_url(url)
    StreamConsumer(client, STREAM_ROLLOUTS, "reward", "doomed").read(count=10, block_ms=1000)
    ready.set()
    time.sleep(60)  # killed before it can ack


def test_entry_of_killed_consumer_is_reclaimed(redis_client, redis_url):
    publish(redis_client, STREAM_ROLLOUTS, _group(7))
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    proc = ctx.Process(target=_consume_without_ack, args=(redis_url, ready))
    proc.start()
    assert ready.wait(10)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    survivor = StreamConsumer(redis_client, STREAM_ROLLOUTS, "reward", "survivor", min_idle_ms=200)
    assert survivor.read(block_ms=10) == []  # not idle long enough yet
    time.sleep(0.3)
    (entry,) = survivor.read(block_ms=10)
    assert entry.payload.group_id == "r:0:7" and entry.deliveries == 2
    survivor.ack(entry.id)
    assert redis_client.xpending(STREAM_ROLLOUTS, "reward")["pending"] == 0


def test_dead_letter_after_max_deliveries(redis_client):
    entry_id = publish(redis_client, STREAM_ROLLOUTS, _group(1))
    seen = 0
    for attempt in range(5):
        consumer = StreamConsumer(redis_client, STREAM_ROLLOUTS, "reward", "flaky", max_deliveries=3)
        entries = consumer.read(block_ms=10)
        seen += len(entries)
    assert seen == 3  # delivered 3 times, the 4th delivery goes to the dead-letter stream
    dead = redis_client.xrange(f"{STREAM_ROLLOUTS}:dead")
    assert len(dead) == 1
    fields = {k.decode(): v.decode() for k, v in dead[0][1].items()}
    assert fields["dead.id"] == entry_id and fields["dead.deliveries"] == "4"
    assert redis_client.xpending(STREAM_ROLLOUTS, "reward")["pending"] == 0


def test_dead_letter_hook_runs_first_and_a_failing_hook_keeps_the_entry(redis_client):
    entry_id = publish(redis_client, STREAM_ROLLOUTS, _group(2))
    recorded = []

    def failing(entry, reason):
        raise RuntimeError("hook down")

    def recording(entry, reason):
        assert redis_client.xpending(STREAM_ROLLOUTS, "reward")["pending"] == 1, "still pending while the hook runs"
        recorded.append((entry.id, reason))

    StreamConsumer(redis_client, STREAM_ROLLOUTS, "reward", "c", max_deliveries=1).read(block_ms=10)  # delivery 1
    hooked = StreamConsumer(redis_client, STREAM_ROLLOUTS, "reward", "c", max_deliveries=1, on_dead_letter=failing)
    try:
        hooked.read(block_ms=10)
        raise AssertionError("the hook's error propagates")
    except RuntimeError:
        pass
    assert redis_client.xpending(STREAM_ROLLOUTS, "reward")["pending"] == 1 and not redis_client.exists(f"{STREAM_ROLLOUTS}:dead")
    StreamConsumer(redis_client, STREAM_ROLLOUTS, "reward", "c", max_deliveries=1, on_dead_letter=recording).read(block_ms=10)
    assert recorded == [(entry_id, "delivered 3 times (max 1)")]
    assert redis_client.xlen(f"{STREAM_ROLLOUTS}:dead") == 1


def test_prune_idle_groups_removes_only_idle_replica_groups(redis_client):
    publish(redis_client, STREAM_ROLLOUTS, _group(0))
    for name in ("rollout:gone", "rollout:live", "rollout:me", "reward"):
        StreamConsumer(redis_client, STREAM_ROLLOUTS, name, "c").read(block_ms=10)
    redis_client.xgroup_create(STREAM_ROLLOUTS, "rollout:new-no-consumer", id="0")
    time.sleep(0.3)
    StreamConsumer(redis_client, STREAM_ROLLOUTS, "rollout:live", "c").read(block_ms=10)  # recently active
    removed = prune_idle_groups(redis_client, STREAM_ROLLOUTS, "rollout:", keep="rollout:me", max_idle_ms=200)
    assert removed == ["rollout:gone"]
    left = {g["name"].decode() for g in redis_client.xinfo_groups(STREAM_ROLLOUTS)}
    assert left == {"rollout:live", "rollout:me", "rollout:new-no-consumer", "reward"}


def test_undecodable_entry_is_reported_not_raised(redis_client):
    redis_client.xadd(STREAM_ROLLOUTS, {"type": "rollout_group", "data": "{not json"})
    redis_client.xadd(STREAM_ROLLOUTS, {"type": "mystery", "data": "{}"})
    consumer = StreamConsumer(redis_client, STREAM_ROLLOUTS, "reward", "c")
    entries = consumer.read(block_ms=10)
    assert [e.payload for e in entries] == [None, None]
    assert "unknown message type" in entries[1].error
    for entry in entries:
        consumer.dead_letter(entry, entry.error)
    assert redis_client.xlen(f"{STREAM_ROLLOUTS}:dead") == 2


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"run_id": "r", "iteration": 3, "sample_id": "r:3:0:1", "weight": "heavy"}, ("r", 3, "r:3:0:1")),
        ({"run_id": "r", "iteration": -1, "sample_id": "s"}, None),
        ({"run_id": "r", "iteration": True, "sample_id": "s"}, None),
        ({"run_id": "", "iteration": 0, "sample_id": "s"}, None),
        ({"run_id": "r", "iteration": 0}, None),
        (["r", 0, "s"], None),
        ("{not json", None),
    ],
)
def test_entry_identity_reads_ids_from_entries_that_fail_validation(data, expected):
    raw = data if isinstance(data, str) else json.dumps(data)
    assert entry_identity({"type": WeightedSample.kind, "data": raw}, WeightedSample.kind, "sample_id") == expected
    # an entry of another type is never attributed
    assert entry_identity({"type": RolloutGroup.kind, "data": raw}, WeightedSample.kind, "sample_id") is None
