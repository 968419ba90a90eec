"""Redis stream helpers: publish, consumer-group read, ack, reclaim, dead-letter.

Delivery is at-least-once: a consumer acks only after its work is durable;
entries left pending by a dead consumer are reclaimed (XAUTOCLAIM) once idle
for ``min_idle_ms``; an entry delivered more than ``max_deliveries`` times is
moved to ``<stream>:dead`` and acked so it cannot block the group forever.
Consumers must therefore be idempotent (every payload carries an id).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import redis

from shared.schemas import StreamPayload, decode_message, encode_message

log = logging.getLogger(__name__)


def publish(client: redis.Redis, stream: str, payload: StreamPayload) -> str:
    return as_text(client.xadd(stream, encode_message(payload)))


@dataclass
class StreamEntry:
    id: str
    fields: dict[str, str]
    deliveries: int = 1
    payload: StreamPayload | None = None
    error: str | None = None  # why ``payload`` could not be decoded


def as_text(value) -> str:
    """A Redis reply value (bytes unless the client decodes) as str."""
    return value.decode() if isinstance(value, bytes) else str(value)


class StreamConsumer:
    """One consumer in a consumer group of one stream.

    ``read`` hands out, in this order: this consumer's own pending entries
    (left from before a restart under the same name, or from before a lost
    connection), entries of dead consumers idle for ``min_idle_ms``, then new
    entries.
    """

    def __init__(
        self,
        client: redis.Redis,
        stream: str,
        group: str,
        consumer: str,
        *,
        min_idle_ms: int = 60_000,
        max_deliveries: int = 5,
        start_id: str = "0",
        on_dead_letter: Callable[[StreamEntry, str], None] | None = None,
    ):
        self.client = client
        self.on_dead_letter = on_dead_letter
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.min_idle_ms = min_idle_ms
        self.max_deliveries = max_deliveries
        self.dead_letter_stream = f"{stream}:dead"
        self._own_pending_done = False
        self.ensure_group(start_id)

    def ensure_group(self, start_id: str = "0") -> None:
        try:
            self.client.xgroup_create(self.stream, self.group, id=start_id, mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def read(self, count: int = 16, block_ms: int | None = 1000) -> list[StreamEntry]:
        try:
            return self._read(count, block_ms)
        except (redis.ConnectionError, redis.TimeoutError):
            self._lost_connection()
            raise

    def _lost_connection(self) -> None:
        """After a Redis outage our own pending entries come first again: an ack sent in the server's last
        second (appendfsync everysec) may be lost, and the entry would otherwise wait for the idle reclaim."""
        self._own_pending_done = False

    def _read(self, count: int, block_ms: int | None) -> list[StreamEntry]:
        if not self._own_pending_done:
            entries = self._xreadgroup("0", count, None)
            if entries:
                return entries
            self._own_pending_done = True
        entries = self.reclaim(count)
        if entries:
            return entries
        return self._xreadgroup(">", count, block_ms)

    def _xreadgroup(self, start: str, count: int, block_ms: int | None) -> list[StreamEntry]:
        reply = self.client.xreadgroup(self.group, self.consumer, {self.stream: start}, count=count, block=block_ms)
        raw = [(i, f) for _, items in (reply or []) for i, f in items if f]  # history may hold deleted ids
        return self._entries(raw)

    def reclaim(self, count: int = 16) -> list[StreamEntry]:
        """Takes over entries other consumers left pending for ``min_idle_ms``."""
        reply = self.client.xautoclaim(
            self.stream, self.group, self.consumer, min_idle_time=self.min_idle_ms, start_id="0-0", count=count
        )
        claimed = [(i, f) for i, f in reply[1] if f]
        return self._entries(claimed)

    def _entries(self, raw: list) -> list[StreamEntry]:
        if not raw:
            return []
        ids = [as_text(i) for i, _ in raw]
        deliveries = self._delivery_counts(ids)
        out = []
        for (entry_id, fields), id_text in zip(raw, ids):
            entry = StreamEntry(id=id_text, fields={as_text(k): as_text(v) for k, v in fields.items()})
            entry.deliveries = deliveries.get(id_text, 1)
            if entry.deliveries > self.max_deliveries:
                self.dead_letter(entry, f"delivered {entry.deliveries} times (max {self.max_deliveries})")
                continue
            try:
                entry.payload = decode_message(entry.fields)
            except ValueError as exc:
                entry.error = str(exc)
            out.append(entry)
        return out

    def _delivery_counts(self, ids: list[str]) -> dict[str, int]:
        lo, hi = min(ids, key=_id_key), max(ids, key=_id_key)
        rows = self.client.xpending_range(self.stream, self.group, min=lo, max=hi, count=len(ids) + 1000)
        return {as_text(r["message_id"]): int(r["times_delivered"]) for r in rows}

    def ack(self, *ids: str) -> int:
        try:
            return self.client.xack(self.stream, self.group, *ids) if ids else 0
        except (redis.ConnectionError, redis.TimeoutError):
            self._lost_connection()
            raise

    def dead_letter(self, entry: StreamEntry, reason: str) -> None:
        """Moves an entry to ``<stream>:dead`` with the reason, then acks it.

        ``on_dead_letter`` runs first: if it raises, the entry stays pending and
        the next delivery tries again, so what the hook records is never lost.
        """
        log.warning("event=dead_letter stream=%s id=%s reason=%s", self.stream, entry.id, reason)
        if self.on_dead_letter is not None:
            self.on_dead_letter(entry, reason)
        fields = dict(entry.fields)
        fields.update(
            {"dead.id": entry.id, "dead.group": self.group, "dead.reason": reason, "dead.deliveries": str(entry.deliveries)}
        )
        pipe = self.client.pipeline(transaction=True)
        pipe.xadd(self.dead_letter_stream, fields)
        pipe.xack(self.stream, self.group, entry.id)
        pipe.execute()


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def prune_idle_groups(client: redis.Redis, stream: str, prefix: str, *, keep: str, max_idle_ms: int) -> list[str]:
    """Destroys the consumer groups of ``stream`` named ``prefix...`` (except ``keep``) whose consumers
    have all been idle for ``max_idle_ms``: the groups of replicas that are gone (a restarted pod gets
    a new name). Groups without consumers are left alone (a replica that has not read yet)."""
    removed = []
    for info in client.xinfo_groups(stream):
        name = as_text(info["name"])
        if not name.startswith(prefix) or name == keep:
            continue
        consumers = client.xinfo_consumers(stream, name)
        if consumers and min(int(c["idle"]) for c in consumers) >= max_idle_ms:
            client.xgroup_destroy(stream, name)
            removed.append(name)
            log.info("event=idle_group_removed stream=%s group=%s", stream, name)
    return removed
