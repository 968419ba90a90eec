"""Waiting for a new adapter on every live rollout replica (heartbeats in a real Redis)."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import redis

from services.orchestrator.progress import StageTimeout, wait_for_adapter
from shared import heartbeats
from shared.schemas import STREAM_ADAPTERS, AdapterStatus
from shared.streams import publish


@pytest.fixture
def redis_client(redis_url):
    """A database of its own: rollout services of other suites beat into database 0 of the session Redis."""
    client = redis.Redis.from_url(redis_url.rsplit("/", 1)[0] + "/7")  # the URL's own /0 would win over db=
    client.flushdb()
    yield client
    client.close()


def _loaded(client, replica: str, version: str = "iter-0003", status: str = "loaded") -> None:
    publish(client, STREAM_ADAPTERS, AdapterStatus(run_id="r", iteration=3, version=version, replica=replica, status=status))


def test_live_replicas_are_those_with_a_recent_beat(redis_client):
    heartbeats.beat(redis_client, "a", now=100.0)
    heartbeats.beat(redis_client, "b", now=95.0)
    assert heartbeats.live_replicas(redis_client, ttl_s=10, now=104.0) == {"a", "b"}
    assert heartbeats.live_replicas(redis_client, ttl_s=10, now=107.0) == {"a"}
    heartbeats.leave(redis_client, "a")
    assert heartbeats.live_replicas(redis_client, ttl_s=10, now=104.0) == {"b"}


def test_one_loaded_replica_is_not_enough_while_another_is_live(redis_client):
    heartbeats.beat(redis_client, "a")
    heartbeats.beat(redis_client, "b")
    _loaded(redis_client, "a")
    _loaded(redis_client, "a", version="iter-0002")  # another version does not count for b
    with pytest.raises(StageTimeout, match="b to load adapter iter-0003"):
        wait_for_adapter(redis_client, "r", "iter-0003", timeout=1.5)
    _loaded(redis_client, "b")
    assert wait_for_adapter(redis_client, "r", "iter-0003", timeout=5).replica in {"a", "b"}


def test_a_replica_whose_heartbeat_stops_is_no_longer_waited_for(redis_client, caplog):
    heartbeats.beat(redis_client, "a")
    heartbeats.beat(redis_client, "dead")
    _loaded(redis_client, "a")
    stop = threading.Event()

    def keep_a_alive():  # "dead" never beats again
        while not stop.wait(0.2):
            heartbeats.beat(redis_client, "a")

    thread = threading.Thread(target=keep_a_alive, daemon=True)
    thread.start()
    started = time.monotonic()
    try:
        with caplog.at_level(logging.WARNING, logger="services.orchestrator.progress"):
            status = wait_for_adapter(redis_client, "r", "iter-0003", timeout=30, ttl_s=1.5)
    finally:
        stop.set()
    assert status.replica == "a" and time.monotonic() - started >= 1.0  # waited for "dead" until its beat expired
    assert any("replica_left replica=dead" in r.getMessage() for r in caplog.records)


def test_a_rejection_by_any_replica_is_an_error(redis_client):
    heartbeats.beat(redis_client, "a")
    _loaded(redis_client, "a", status="rejected")
    with pytest.raises(RuntimeError, match="rollout replica a rejected adapter iter-0003"):
        wait_for_adapter(redis_client, "r", "iter-0003", timeout=5)


def test_without_heartbeats_the_first_status_counts(redis_client):
    _loaded(redis_client, "legacy")
    assert wait_for_adapter(redis_client, "r", "iter-0003", timeout=5).replica == "legacy"
