"""The reward worker: rollout groups in, weighted samples out (paper 3.3-3.4).

Loop: read a batch of STREAM_ROLLOUTS entries (consumer group), score the
groups not scored before in one batched call, store their metrics in Redis,
then, for every iteration the batch touched whose K groups are all scored,
finalize it, and only then ack. Finalizing = one worker (Redis lock) applies
eq. 5-9 over the whole iteration and publishes one WeightedSample per response
and an IterationComplete(stage="reward") marker, each exactly once (see
``state.py``). A crash anywhere leaves entries unacked; their redelivery
finds the stored scores and redoes only what is missing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis

from services.reward.config import RewardSettings
from services.reward.state import MARKER_ID, IterationState, ScoredGroup
from services.reward.telemetry import Telemetry
from shared.calibration import DegenerateGroups, calibrate
from shared.group_health import GroupHealth, Outcome, group_health
from shared.schemas import STREAM_ROLLOUTS, STREAM_SAMPLES, IterationComplete, RolloutGroup, WeightedSample, entry_identity
from shared.streams import StreamConsumer, StreamEntry

log = logging.getLogger(__name__)

ScoreFn = Callable[[list[tuple[str, list[str]]]], list[list]]


def weighted_samples(scored: list[ScoredGroup], degenerate_groups: DegenerateGroups = "omega_plus") -> list[WeightedSample]:
    """eq. 5-9 over one iteration's groups -> one sample per response."""
    calibrated = calibrate([s.metrics for s in scored], degenerate_groups=degenerate_groups)
    samples = []
    for s, results in zip(scored, calibrated):
        g = s.group
        finish = g.finish_reasons if len(g.finish_reasons) == len(g.responses) else [None] * len(g.responses)
        for i, (text, c) in enumerate(zip(g.responses, results)):
            samples.append(WeightedSample(
                run_id=g.run_id, iteration=g.iteration, sample_id=f"{g.group_id}:{i}", group_id=g.group_id,
                response_index=i, query=g.query, response=text, weight=c.weight,
                label="desirable" if c.desirable else "undesirable", parsed=c.parsed, z=c.z, rank_sum=c.rank_sum,
                metrics=s.metrics[i], finish_reason=finish[i], adapter_version=g.adapter_version,
                query_source=g.query_source,
            ))  # fmt: skip
    return samples


def samples_health(samples: list[WeightedSample]) -> GroupHealth:
    """Group health of one iteration's weighted samples (groups by ``group_id``)."""
    groups: dict[str, list[Outcome]] = {}
    for s in samples:
        metrics = s.metrics.model_dump() if s.metrics else None
        groups.setdefault(s.group_id, []).append(Outcome(s.parsed, s.z, s.finish_reason, metrics))
    return group_health(list(groups.values()))


class RewardWorker:
    def __init__(self, client: redis.Redis, score: ScoreFn, settings: RewardSettings, telemetry: Telemetry | None = None):
        self.client = client
        self.score = score
        self.settings = settings
        self.telemetry = telemetry or Telemetry()
        self.consumer = StreamConsumer(
            client, STREAM_ROLLOUTS, settings.consumer_group, settings.consumer_name,
            min_idle_ms=settings.min_idle_ms, max_deliveries=settings.max_deliveries, on_dead_letter=self._dropped,
        )  # fmt: skip

    def run(self, stop: threading.Event) -> None:
        log.info("event=worker_started consumer=%s group=%s", self.settings.consumer_name, self.settings.consumer_group)
        while not stop.is_set():
            try:
                entries = self.consumer.read(count=self.settings.worker_batch, block_ms=self.settings.block_ms)
                if entries:
                    self.process_isolating_failures(entries)
            except redis.ConnectionError as exc:
                log.warning("event=worker_redis_error error=%s", exc)
                stop.wait(1.0)
            except Exception:  # entries stay pending: reclaimed later, dead-lettered after max_deliveries
                self.telemetry.worker_errors.inc()
                log.exception("event=worker_batch_failed")
                stop.wait(1.0)
        log.info("event=worker_stopped consumer=%s", self.settings.consumer_name)

    def process_isolating_failures(self, entries: list[StreamEntry]) -> None:
        """``process``; if the batch fails, each entry alone, so one poison group (dead-lettered after
        ``max_deliveries``) cannot take its batch-mates with it."""
        try:
            self.process(entries)
        except Exception:
            if len(entries) == 1:
                raise
            log.exception("event=worker_batch_failed entries=%d retrying=one_by_one", len(entries))
            self.telemetry.worker_errors.inc()
            for entry in entries:
                try:
                    self.process([entry])
                except Exception:
                    self.telemetry.worker_errors.inc()
                    log.exception("event=worker_entry_failed id=%s deliveries=%d", entry.id, entry.deliveries)

    def _dropped(self, entry: StreamEntry, reason: str) -> None:
        """A rollout group is being dead-lettered: its iteration finalizes without it. Runs before the
        entry is acked, so a crash here leaves the entry pending and its next delivery does this again.
        A group that fails validation is still dropped from its iteration if its JSON names it."""
        identity = entry_identity(entry.fields, RolloutGroup.kind, "group_id")
        if identity is None:
            return
        run_id, iteration, group_id = identity
        state = self._state(run_id, iteration)
        state.drop(group_id, reason)
        log.warning("event=group_dropped run=%s iteration=%d group=%s reason=%s", run_id, iteration, group_id, reason)
        self.finalize(state)

    def process(self, entries: list[StreamEntry]) -> None:
        touched: dict[tuple[str, int], IterationState] = {}
        groups: list[RolloutGroup] = []
        for entry in entries:
            payload = entry.payload
            if payload is None:
                self.consumer.dead_letter(entry, entry.error or "undecodable")
                continue
            state = touched.setdefault((payload.run_id, payload.iteration), self._state(payload.run_id, payload.iteration))
            if isinstance(payload, RolloutGroup):
                groups.append(payload)
            elif isinstance(payload, IterationComplete) and payload.stage == "rollout":
                state.set_expected(payload.count)
                log.info("event=rollout_marker run=%s iteration=%d groups=%d", payload.run_id, payload.iteration, payload.count)
        self._score_new(groups, touched)
        for state in touched.values():
            self.finalize(state)
        handled = [e.id for e in entries if e.payload is not None]
        self.consumer.ack(*handled)

    def _state(self, run_id: str, iteration: int) -> IterationState:
        return IterationState(self.client, run_id, iteration)

    def _score_new(self, groups: list[RolloutGroup], states: dict[tuple[str, int], IterationState]) -> None:
        unique = {g.group_id: g for g in groups}
        todo: list[RolloutGroup] = []
        for key, state in states.items():
            mine = [g for g in unique.values() if (g.run_id, g.iteration) == key]
            if mine and state.is_finalized():
                log.warning("event=late_groups run=%s iteration=%d groups=%d", key[0], key[1], len(mine))
                continue
            done = state.scored_ids([g.group_id for g in mine])
            todo += [g for g in mine if g.group_id not in done]
        if not todo:
            return
        started = time.perf_counter()
        metrics = self.score([(g.query, list(g.responses)) for g in todo])
        for key, state in states.items():
            state.save([ScoredGroup(g, m) for g, m in zip(todo, metrics) if (g.run_id, g.iteration) == key])
        parsed = sum(m is not None for ms in metrics for m in ms)
        self.telemetry.groups_scored.inc(len(todo))
        log.info(
            "event=groups_scored groups=%d responses=%d parsed=%d seconds=%.2f",
            len(todo), sum(len(m) for m in metrics), parsed, time.perf_counter() - started,
        )  # fmt: skip

    def finalize(self, state: IterationState) -> bool:
        """Publishes the iteration's samples and marker once all K groups are scored; True if it is finalized."""
        while True:
            if state.is_finalized():
                return True
            if not state.is_complete():
                return False
            lock = state.acquire(self.settings.lock_ttl_ms)
            if lock is None:  # another worker is finalizing (or checking): wait for it, or for its lock to expire
                time.sleep(0.05)
                continue
            try:
                if state.is_finalized() or not state.is_complete():
                    continue
                self._publish(state)
                return True
            finally:
                state.release(lock)

    def _publish(self, state: IterationState) -> None:
        started = time.perf_counter()
        samples = weighted_samples(state.load_all(), self.settings.degenerate_groups)
        added = state.publish_once(STREAM_SAMPLES, [(s.sample_id, s) for s in samples])
        marker = IterationComplete(run_id=state.run_id, iteration=state.iteration, stage="reward", count=len(samples))
        state.publish_once(STREAM_SAMPLES, [(MARKER_ID, marker)])
        state.expire()
        self.telemetry.samples_published.inc(added)
        self.telemetry.iterations.inc()
        health = samples_health(samples)
        self.telemetry.record_health("iteration", health)
        self.telemetry.health_iteration.set(state.iteration)
        log.info(
            "event=iteration_finalized run=%s iteration=%d samples=%d newly_published=%d dropped_groups=%d "
            "zero_variance_share=%s parse_rate=%s truncation_rate=%s seconds=%.2f",
            state.run_id, state.iteration, len(samples), added, len(state.dropped()), health.zero_variance_share,
            health.parse_rate, health.truncation_rate, time.perf_counter() - started,
        )  # fmt: skip
