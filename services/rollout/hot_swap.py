"""Adapter hot swap (the adapter manager): adapter events from Redis -> validated, versioned LoRA in vLLM -> `policy`.

Each replica reads ``STREAM_ADAPTERS`` in its own consumer group
(``rollout:<replica>``), so every replica sees every event (fan-out), and a
replica that restarts resumes where its group stopped. An event is acked only
after it was handled (loaded, or rejected with an ``AdapterStatus``).

Checks run before vLLM is called, since vLLM answers a bad path with 404, a
too-high rank with a 500, and a loading error during generation has crashed
servers (vLLM #13698).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import httpx
import redis

from services.rollout.registry import AdapterRecord, AdapterRegistry
from shared import heartbeats
from shared.adapters import ADAPTER_FILES, AdapterStore, adapter_checksum, adapter_rank
from shared.schemas import STREAM_ADAPTERS, AdapterEvent, AdapterStatus, decode_message
from shared.streams import StreamConsumer, StreamEntry, prune_idle_groups, publish

log = logging.getLogger(__name__)


def validate_adapter(event: AdapterEvent, store: AdapterStore, max_rank: int) -> str | None:
    """Why the adapter must not be loaded, or None if it may."""
    if not store.contains(event.path):
        return f"path {event.path} is outside the adapter root {store.root}"
    path = Path(event.path)
    missing = [name for name in ADAPTER_FILES if not (path / name).is_file()]
    if missing:
        return f"missing PEFT file(s): {', '.join(missing)}"
    try:
        rank = adapter_rank(path)
    except (ValueError, TypeError, OSError) as exc:
        return f"unreadable adapter_config.json: {exc}"
    if rank > max_rank:
        return f"rank {rank} is above the maximum {max_rank}"
    if rank < 1:
        return "adapter_config.json has no rank"
    checksum = adapter_checksum(path)
    if checksum != event.checksum:
        return f"checksum mismatch: files hash to {checksum[:12]}, event says {event.checksum[:12]}"
    return None


def served_name(event: AdapterEvent) -> str:
    """The versioned vLLM name: new for every version, never reused (no in-place reload)."""
    return "policy-" + re.sub(r"[^A-Za-z0-9._-]", "_", f"{event.run_id}-{event.version}")


@dataclass
class Outcome:
    status: Literal["loaded", "rejected", "duplicate"]
    reason: str | None = None


class AdapterManager:
    def __init__(
        self,
        client: redis.Redis,
        registry: AdapterRegistry,
        vllm_url: str,
        *,
        adapter_root: str | Path,
        replica: str,
        max_rank: int,
        block_ms: int = 1000,
        group_max_idle_s: float = 0,
    ):
        self.redis = client
        self.registry = registry
        self.http = httpx.Client(base_url=vllm_url.rstrip("/"), timeout=httpx.Timeout(10.0, read=300.0))
        self.store = AdapterStore(adapter_root)
        self.replica = replica
        self.max_rank = max_rank
        self.block_ms = block_ms
        self.consumer = StreamConsumer(client, STREAM_ADAPTERS, f"rollout:{replica}", replica)
        self.group_max_idle_s = group_max_idle_s
        self._stop = threading.Event()

    # ---------------------------------------------------------------- stream side

    def receive(self, block_ms: int | None) -> list[StreamEntry]:
        """The next entries of this replica's group (None: do not block); re-creates the group if Redis lost it."""
        try:
            return self.consumer.read(count=16, block_ms=block_ms)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc) and "no longer exists" not in str(exc):
                raise
            log.warning("event=adapter_group_recreated replica=%s", self.replica)
            self.consumer.ensure_group("0")
            return []

    def catch_up(self) -> int:
        """Handles the backlog without blocking (before the replica reports ready); returns the entries read.
        First removes the groups of replicas gone for ``group_max_idle_s`` (they would only grow)."""
        if self.group_max_idle_s > 0:
            prune_idle_groups(self.redis, STREAM_ADAPTERS, "rollout:", keep=self.consumer.group,
                              max_idle_ms=int(self.group_max_idle_s * 1000))  # fmt: skip
        total = 0
        while True:
            entries = self.receive(None)
            if not entries:
                break
            total += len(entries)
            self._handle(entries)
        if self.registry.current.path is None and (newest := self.newest_event()) is not None:
            # a replica restarted under its old name: its group had acked every event, so nothing above
            # loaded the adapter it served before the restart
            log.info("event=adapter_restored version=%s replica=%s", newest.version, self.replica)
            self.handle(newest)
        return total

    def newest_event(self, page: int = 100) -> AdapterEvent | None:
        """The last AdapterEvent on the stream (what ``policy`` means on every replica that has read it)."""
        last = "+"
        while True:
            rows = self.redis.xrevrange(STREAM_ADAPTERS, max=last, count=page)
            for entry_id, fields in rows:
                try:
                    payload = decode_message(fields)
                except ValueError:
                    continue
                if isinstance(payload, AdapterEvent):
                    return payload
            if len(rows) < page:
                return None
            oldest = rows[-1][0].decode() if isinstance(rows[-1][0], bytes) else rows[-1][0]
            last = f"({oldest}"

    def poll_once(self, block_ms: int | None = -1) -> list[Outcome]:
        """Waits up to ``block_ms`` (default: the configured poll) for entries and handles them."""
        return self._handle(self.receive(self.block_ms if block_ms == -1 else block_ms))

    def _handle(self, entries: list[StreamEntry]) -> list[Outcome]:
        """Handles entries in order, acks each, then unloads drained versions."""
        outcomes = []
        for entry in entries:
            if isinstance(entry.payload, AdapterEvent):
                outcomes.append(self.handle(entry.payload))
            elif entry.payload is None:
                log.warning("event=adapter_entry_undecodable id=%s error=%s", entry.id, entry.error)
            self.consumer.ack(entry.id)  # AdapterStatus entries (ours and other replicas') are skipped
        self.unload_drained()
        return outcomes

    def run(self) -> None:
        log.info("event=adapter_manager_started replica=%s group=%s", self.replica, self.consumer.group)
        while not self._stop.is_set():
            try:
                self.poll_once()
            except (redis.RedisError, httpx.HTTPError) as exc:
                log.warning("event=adapter_manager_error error=%s detail=%s", type(exc).__name__, exc)
                self._stop.wait(1.0)
        self.http.close()

    def stop(self) -> None:
        self._stop.set()

    def heartbeat(self, every_s: float = heartbeats.HEARTBEAT_TTL_S / 5) -> None:
        """Announces the replica (``shared.heartbeats``) until stopped, in its own thread so a slow adapter
        load never looks like a dead replica; leaves the set on a clean stop."""
        while True:
            try:
                heartbeats.beat(self.redis, self.replica)
            except redis.RedisError as exc:  # Redis restarting: beat again when it is back
                log.warning("event=heartbeat_failed error=%s", type(exc).__name__)
            if self._stop.wait(every_s):
                break
        try:
            heartbeats.leave(self.redis, self.replica)
        except redis.RedisError:
            pass

    def start_thread(self) -> threading.Thread:
        for target, name in ((self.heartbeat, "heartbeat"), (self.run, "adapter-manager")):
            thread = threading.Thread(target=target, name=f"{name}-{self.replica}", daemon=True)
            thread.start()
        return thread

    # ---------------------------------------------------------------- vLLM side

    def handle(self, event: AdapterEvent) -> Outcome:
        name = served_name(event)
        known = self.registry.find(event.version)
        if known is not None and known.model == name:
            if known.checksum == event.checksum:
                log.info("event=adapter_duplicate version=%s model=%s", event.version, name)
                return Outcome("duplicate")
            return self._reject(event, "version already loaded with a different checksum")
        reason = validate_adapter(event, self.store, self.max_rank)
        if reason is not None:
            return self._reject(event, reason)
        started = time.perf_counter()
        path = str(Path(event.path).resolve())
        response = self.http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
        if response.status_code != 200 and not self._loaded_in_vllm(name, path):
            return self._reject(event, f"vLLM refused the adapter ({response.status_code}): {response.text[:300]}")
        record = AdapterRecord(version=event.version, model=name, path=event.path, checksum=event.checksum)
        previous = self.registry.switch(record)
        load_s = time.perf_counter() - started
        log.info(
            "event=adapter_loaded version=%s model=%s previous=%s load_s=%.3f since_event_s=%.3f",
            event.version, name, previous.version, load_s, time.time() - event.created_at,
        )  # fmt: skip
        self._status(event, "loaded")
        self.unload_drained()
        return Outcome("loaded")

    def _loaded_in_vllm(self, name: str, path: str) -> bool:
        """True if vLLM already serves ``name`` from ``path`` (a restarted gateway, or replicas sharing one vLLM)."""
        try:
            cards = self.http.get("/v1/models").json().get("data", [])
        except (httpx.HTTPError, ValueError):
            return False
        return any(card.get("id") == name and card.get("root") == path for card in cards)

    def unload_drained(self) -> None:
        for record in self.registry.drainable():
            response = self.http.post("/v1/unload_lora_adapter", json={"lora_name": record.model})
            if response.status_code not in (200, 404):  # 404: already gone (e.g. vLLM restarted)
                log.warning("event=adapter_unload_failed model=%s status=%s", record.model, response.status_code)
                continue
            self.registry.forget(record.model)
            log.info("event=adapter_unloaded version=%s model=%s", record.version, record.model)

    def _reject(self, event: AdapterEvent, reason: str) -> Outcome:
        log.warning("event=adapter_rejected version=%s replica=%s reason=%s", event.version, self.replica, reason)
        self._status(event, "rejected", reason)
        return Outcome("rejected", reason)

    def _status(self, event: AdapterEvent, status: Literal["loaded", "rejected"], reason: str | None = None) -> None:
        publish(
            self.redis,
            STREAM_ADAPTERS,
            AdapterStatus(
                run_id=event.run_id, iteration=event.iteration, version=event.version,
                replica=self.replica, status=status, reason=reason,
            ),
        )  # fmt: skip
