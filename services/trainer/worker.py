"""The trainer's stream loop: samples in, one epoch per iteration, adapters out.

1. Reads ``grace:samples`` in the consumer group; each WeightedSample is
   stored in Redis (hash per iteration, keyed by sample id) and acked in one
   transaction; IterationComplete(stage="reward") records the expected count.
2. When a run's next iteration holds its N distinct samples, trains one epoch,
   starting from the run's latest adapter (fresh LoRA for the first).
3. Writes the adapter into the store (temp dir + rename, checksum) as
   ``iter-<iteration:04d>``, publishes an AdapterEvent, records the iteration.

After a crash anywhere, a restart redoes only what is missing: samples are
durable before their ack, an existing adapter version is never retrained or
rewritten (its event is republished if it was not yet), and a finished
iteration is skipped.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import redis

from services.trainer.batching import iteration_steps
from services.trainer.config import TrainerSettings
from services.trainer.state import TrainerState
from services.trainer.train import rank_world
from shared.adapters import VERSION_RE, AdapterStore, adapter_checksum, adapter_rank, adapter_version, staleness
from shared.rope import RopeMismatch, check_rope
from shared.runs import RunConfig, load_run_config, samples_file, write_samples_file
from shared.schemas import (
    STREAM_ADAPTERS,
    STREAM_SAMPLES,
    AdapterEvent,
    IterationComplete,
    WeightedSample,
    decode_message,
    entry_identity,
)
from shared.streams import StreamConsumer, StreamEntry, publish

log = logging.getLogger(__name__)

OPTIMIZER_FILE = "optimizer.pt"  # lr_schedule="run": AdamW state + steps done, beside the adapter


def run_steps_estimate(run_config: RunConfig, settings: TrainerSettings, loss: str) -> list[int]:
    """Estimated optimizer steps of every iteration of a run (lr_schedule="run"): K_i x m samples per round
    (K_i best-vs-worst pairs for DPO/ORPO; SFT keeps only the positives, so its estimate is high), epochs passes."""
    per_query = 1 if loss in ("dpo", "orpo") else run_config.responses_per_query
    return [
        iteration_steps(run_config.queries_in(i) * per_query, settings.batch_size, settings.epochs)
        for i in range(run_config.iterations)
    ]


def latest_adapter(store: AdapterStore, run_id: str, before: int) -> Path | None:
    """The run's newest complete adapter of an iteration < ``before`` (the starting point of the next)."""
    run_dir = store.root / run_id
    best: tuple[int, Path] | None = None
    for path in run_dir.glob("iter-*") if run_dir.is_dir() else []:
        match = VERSION_RE.match(path.name)
        if match and int(match.group(1)) < before and store.exists(run_id, path.name):
            if best is None or int(match.group(1)) > best[0]:
                best = (int(match.group(1)), path)
    return best[1] if best else None


def split_stale(
    samples: list[WeightedSample], iteration: int, max_staleness: int | None
) -> tuple[list[WeightedSample], list[WeightedSample]]:
    """(trained, stale): a sample more than ``max_staleness`` adapter versions behind the on-policy one is
    stale (None = none is). A sample of unknown version is trained (``shared.adapters.staleness``)."""
    if max_staleness is None:
        return samples, []
    fresh, stale = [], []
    for sample in samples:
        lag = staleness(sample.adapter_version, iteration)
        (stale if lag is not None and lag > max_staleness else fresh).append(sample)
    return fresh, stale


class TrainerWorker:
    def __init__(self, settings: TrainerSettings, client: redis.Redis):
        self.settings = settings
        self.client = client
        self.state = TrainerState(client)
        self.store = AdapterStore(settings.adapter_root)
        self.consumer = StreamConsumer(
            client, STREAM_SAMPLES, settings.group, settings.consumer, min_idle_ms=settings.min_idle_ms,
            on_dead_letter=self._dead_lettered,
        )  # fmt: skip
        self._policy: tuple[Any, Any, Any] | None = None  # (model, tokenizer, runtime), loaded at first use
        self.trained = 0
        self.refused: dict[str, str] = {}  # run id -> why it is not trained here (RoPE mismatch)
        self.rank, self.world = rank_world()

    # ---- ingestion

    def ingest(self, count: int | None = None, block_ms: int | None = None) -> int:
        """Stores (and acks) one read's worth of entries; returns how many were read."""
        entries = self.consumer.read(count or self.settings.read_count, self.settings.block_ms if block_ms is None else block_ms)
        stored = 0
        for entry in entries:
            ack = (STREAM_SAMPLES, self.settings.group, entry.id)
            payload = entry.payload
            if payload is None:
                self.consumer.dead_letter(entry, entry.error or "undecodable")
            elif isinstance(payload, WeightedSample):
                self.state.store_sample(payload, ack)
                stored += 1
            elif isinstance(payload, IterationComplete) and payload.stage == "reward":
                self.state.store_complete(payload, ack)
                log.info(
                    "event=iteration_announced run=%s iteration=%d count=%d", payload.run_id, payload.iteration, payload.count
                )
            else:  # not for the trainer
                self.consumer.ack(entry.id)
        if stored:
            log.info("event=samples_stored count=%d", stored)
        return len(entries)

    def _dead_lettered(self, entry: StreamEntry, reason: str) -> None:
        """Runs before a dead-lettered entry is acked (a crash here leaves it pending, so this is redone).

        A sample that can be attributed is recorded as dropped: its iteration trains without it instead
        of waiting forever. An iteration marker is still stored, so its count is not lost.
        """
        try:
            payload = decode_message(entry.fields)
        except ValueError:
            payload = None
        if isinstance(payload, IterationComplete) and payload.stage == "reward":
            self.state.store_complete(payload)
            return
        identity = entry_identity(entry.fields, WeightedSample.kind, "sample_id")
        if identity is None:
            if entry.fields.get("type") == WeightedSample.kind:
                log.error("event=sample_lost id=%s reason=%s detail=dead-lettered entry names no run, iteration and "
                          "sample id; its iteration cannot complete", entry.id, reason)  # fmt: skip
            return
        run_id, iteration, sample_id = identity
        self.state.drop_sample(run_id, iteration, sample_id, reason)
        log.warning("event=sample_dropped run=%s iteration=%d sample=%s reason=%s", run_id, iteration, sample_id, reason)

    # ---- training

    def ready(self) -> list[tuple[str, int]]:
        """(run, iteration) pairs whose next iteration holds all its samples."""
        out = []
        for run_id in self.state.runs():
            nxt = None if run_id in self.refused else self.state.next_iteration(run_id)
            if nxt is None:
                continue
            iteration, expected, arrived = nxt
            if arrived >= expected:
                out.append((run_id, iteration))
            else:
                log.debug(
                    "event=iteration_waiting run=%s iteration=%d arrived=%d expected=%d", run_id, iteration, arrived, expected
                )
        return out

    def policy(self) -> tuple[Any, Any, Any]:
        if self._policy is None:
            from services.trainer.model import load_policy

            self._policy = load_policy(self.settings)
        return self._policy

    def train_iteration(self, run_id: str, iteration: int) -> dict[str, Any]:
        version = adapter_version(iteration)
        samples = self.state.samples(run_id, iteration)
        expected = self.state.expected(run_id).get(iteration)
        dropped = self.state.dropped(run_id, iteration)
        if expected is not None and len(samples) + len(dropped) != expected:
            log.warning("event=sample_count_mismatch run=%s iteration=%d held=%d dropped=%d expected=%d",
                        run_id, iteration, len(samples), len(dropped), expected)  # fmt: skip
        run_config = load_run_config(self.client, run_id)
        check_rope(run_id, run_config and run_config.rope, self.settings.rope(), "trainer")  # RopeMismatch: refused
        loss = run_config.loss if run_config else self.settings.loss
        samples, stale = split_stale(samples, iteration, run_config.max_staleness if run_config else 0)
        if stale:
            log.warning("event=stale_samples_dropped run=%s iteration=%d stale=%d kept=%d sampled_by=%s",
                        run_id, iteration, len(stale), len(samples), sorted({s.adapter_version for s in stale}))  # fmt: skip
        summary: dict[str, Any] = {}
        if self.rank != 0:  # other DeepSpeed ranks only join the training and the adapter gather
            if not self.store.exists(run_id, version):
                self._train_and_write(run_id, iteration, version, samples, loss)
            return {}
        if self.store.exists(run_id, version):
            log.info("event=adapter_exists run=%s version=%s action=skip_training", run_id, version)
            path = self.store.path(run_id, version)
            checksum = adapter_checksum(path)
        else:
            path, checksum, summary = self._train_and_write(run_id, iteration, version, samples, loss)
        # before the event: whoever sees the adapter served finds the file of what trained it
        write_samples_file(samples_file(self.settings.run_root, run_id, iteration), samples)
        if not self.state.is_published(run_id, version):
            event = AdapterEvent(run_id=run_id, iteration=iteration, version=version, path=str(path),
                                 checksum=checksum, rank=adapter_rank(path), loss=loss)  # fmt: skip
            publish(self.client, STREAM_ADAPTERS, event)
            self.state.mark_published(run_id, version)
            log.info("event=adapter_published run=%s version=%s checksum=%s", run_id, version, checksum[:12])
        record = {"version": version, "path": str(path), "checksum": checksum, "samples": len(samples),
                  "dropped": len(dropped), "stale": len(stale), "loss": loss, **summary}  # fmt: skip
        self.state.mark_done(run_id, iteration, record)
        self.trained += 1
        log.info("event=iteration_done run=%s iteration=%d version=%s samples=%d", run_id, iteration, version, len(samples))
        return record

    def _train_and_write(
        self, run_id: str, iteration: int, version: str, samples: list[WeightedSample], loss: str
    ) -> tuple[Path, str, dict[str, Any]]:
        from services.trainer.model import adapter_state_dict, load_adapter_weights, reset_adapter, save_adapter

        model, tokenizer, runtime = self.policy()
        start = latest_adapter(self.store, run_id, iteration)
        if start is not None:
            load_adapter_weights(model, start)
        else:
            run_config = load_run_config(self.client, run_id)
            seed = run_config.seed if run_config is not None and run_config.seed is not None else self.settings.seed
            reset_adapter(model, seed + iteration)
        log.info("event=iteration_training run=%s iteration=%d samples=%d loss=%s start=%s",
                 run_id, iteration, len(samples), loss, start.name if start else "fresh")  # fmt: skip
        metrics_path = Path(self.settings.run_root) / run_id / "train_metrics.jsonl"
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        attempt = time.time()
        with open(metrics_path, "a", encoding="utf-8") as sink:

            def on_step(row: dict[str, Any]) -> None:
                if self.rank == 0:
                    sink.write(json.dumps({"run_id": run_id, "attempt": attempt, "loss_name": loss, **row}) + "\n")
                    sink.flush()

            trainer = self._trainer(run_id, iteration, loss, start, (model, tokenizer, runtime))
            result = trainer.train(samples, iteration, on_step)
        summary = result.summary()
        weights = adapter_state_dict(model)  # a collective under ZeRO-3: every rank takes part
        if self.rank != 0:
            return self.store.path(run_id, version), "", summary

        def save(tmp: Path) -> None:
            save_adapter(model, tmp, weights)
            state = {"run_id": run_id, "iteration": iteration, "version": version, "start": start.name if start else None,
                     "sample_ids": [s.sample_id for s in samples], **summary}  # fmt: skip
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
            optimizer_state = trainer.optimizer_state_dict() if trainer.settings.lr_schedule == "run" else None
            if optimizer_state is not None:  # lr_schedule="run": the next iteration continues this AdamW
                import torch

                torch.save({"state": optimizer_state, "steps_done": trainer.step_offset + result.steps}, tmp / OPTIMIZER_FILE)

        try:
            path, checksum = self.store.write(run_id, version, save)
        except FileExistsError:  # another trainer finished it first: never rewrite
            path = self.store.path(run_id, version)
            checksum = adapter_checksum(path)
        log.info(
            "event=adapter_written run=%s version=%s path=%s tokens_per_s=%s", run_id, version, path, summary["tokens_per_s"]
        )
        return path, checksum, summary

    def _trainer(self, run_id: str, iteration: int, loss: str, start: Path | None, policy: tuple[Any, Any, Any]) -> Any:
        """A Trainer with the run's epochs (RunConfig.epochs, else the setting) and, for lr_schedule="run",
        its place on the run-long cosine and the AdamW state the previous iteration left in ``start``."""
        import torch

        from services.trainer.batching import run_schedule
        from services.trainer.train import Trainer

        run_config = load_run_config(self.client, run_id)
        settings = self.settings
        if run_config is not None and run_config.epochs is not None:
            settings = settings.model_copy(update={"epochs": run_config.epochs})
        if run_config is not None and run_config.seed is not None:  # the run's seed: batch order
            settings = settings.model_copy(update={"seed": run_config.seed})
        if settings.lr_schedule != "run":
            return Trainer(*policy[:2], settings, policy[2], loss=loss)
        if run_config is None:
            log.warning("event=lr_schedule_fallback run=%s iteration=%d detail=no run config in Redis to size a "
                        "run-long cosine; this iteration uses its own schedule", run_id, iteration)  # fmt: skip
            return Trainer(*policy[:2], settings, policy[2], loss=loss)
        carried = None
        if start is not None and (start / OPTIMIZER_FILE).exists():
            carried = torch.load(start / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        offset, later = run_schedule(run_steps_estimate(run_config, settings, loss), iteration,
                                     carried["steps_done"] if carried else None)  # fmt: skip
        log.info("event=lr_schedule run=%s iteration=%d step_offset=%d later_steps=%d optimizer=%s",
                 run_id, iteration, offset, later, "carried" if carried else "fresh")  # fmt: skip
        return Trainer(*policy[:2], settings, policy[2], loss=loss, step_offset=offset, later_steps=later,
                       optimizer_state=carried["state"] if carried else None)  # fmt: skip

    # ---- loop

    def _refuse(self, run_id: str, exc: RopeMismatch) -> None:
        """A run with another RoPE setting than this trainer's (paper 3.6) is not trained here: logged once,
        then skipped by ``ready`` (not marked done: a trainer restarted with the run's setting takes it)."""
        self.refused[run_id] = str(exc)
        log.error("event=rope_mismatch run=%s action=run_refused detail=%s", run_id, exc)

    def run_once(self, block_ms: int | None = None) -> int:
        """One ingest read, then every ready iteration; returns iterations trained."""
        self.ingest(block_ms=block_ms)
        trained = 0
        for run_id, iteration in self.ready():
            lock = self.state.acquire(run_id, iteration, self.settings.consumer, self.settings.lock_ttl_s)
            if lock is None:
                log.info("event=iteration_held_elsewhere run=%s iteration=%d", run_id, iteration)
                continue
            try:
                self.train_iteration(run_id, iteration)
            except RopeMismatch as exc:
                self._refuse(run_id, exc)
                continue
            finally:
                self.state.release(lock)
            trained += 1
        return trained

    def _wait_for_redis(self, exc: Exception, stop: threading.Event, every_s: float = 2.0) -> None:
        """Redis is down or restarting: wait here rather than die, so the loaded policy stays in memory (a
        supervisor restart would reload it, and ``grace serve trainer`` may run with no supervisor at all).
        Every step is idempotent, so the interrupted one is simply redone. A fresh consumer re-reads its own
        pending entries first: an ack lost with the last second of the AOF would otherwise wait ``min_idle_ms``."""
        log.warning("event=trainer_redis_unavailable error=%s detail=%s", type(exc).__name__, exc)
        while not stop.wait(every_s):
            try:
                self.consumer = StreamConsumer(
                    self.client, STREAM_SAMPLES, self.settings.group, self.settings.consumer,
                    min_idle_ms=self.settings.min_idle_ms, on_dead_letter=self._dead_lettered,
                )  # fmt: skip
            except (redis.ConnectionError, redis.TimeoutError):
                continue
            log.info("event=trainer_redis_back")
            return

    def run(self, stop: threading.Event | None = None) -> None:
        """Until ``stop`` (or ``max_iterations``). Under DeepSpeed, rank 0 reads the stream and picks the
        iteration; every rank trains it (samples come from Redis); rank 0 writes and publishes."""
        log.info("event=trainer_started stream=%s group=%s consumer=%s rank=%d world=%d",
                 STREAM_SAMPLES, self.settings.group, self.settings.consumer, self.rank, self.world)  # fmt: skip
        stop = stop or threading.Event()
        while not stop.is_set():
            if self.world == 1:
                try:
                    self.run_once()
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    self._wait_for_redis(exc, stop)
            else:
                import torch.distributed as dist

                box = [self.ready()[:1] if self.rank == 0 and self.ingest() >= 0 else None]
                dist.broadcast_object_list(box, src=0)
                for run_id, iteration in box[0]:
                    try:
                        self.train_iteration(run_id, iteration)
                    except RopeMismatch as exc:  # every rank reads the same run config: all refuse together
                        self._refuse(run_id, exc)
            if self.settings.max_iterations and self.trained >= self.settings.max_iterations:
                log.info("event=trainer_stopping trained=%d", self.trained)
                return
