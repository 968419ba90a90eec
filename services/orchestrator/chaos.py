"""`grace bench chaos`: a semi-online run on the tiny stack while a seeded schedule SIGKILLs its parts.

The same command first runs a fault-free run of the same size on the same stack (the baseline), then the
chaos run: a seeded schedule (``fault_schedule``) SIGKILLs the rollout service (its process group, vLLM
included), the reward service (its stream worker with it), the trainer and the embedded Redis, each at
least once, each at a random point of an iteration's pipeline (rollout -> reward -> training -> hot swap),
drawn as a fraction of the baseline's pipeline time. The stack's supervisor restarts what dies (Redis on
the same folder and port, replaying its append-only file). A fault not yet due when the pipeline ends
fires then; evaluation waits until the stack is healthy again, since it measures the policy, not the
faults.

Accounting, per iteration, from what Redis and the adapter store hold after the run: the distinct
weighted-sample ids on the samples stream (published) against the ids the trainer recorded with the
adapter (trained). ``lost`` = published but never trained (dropped, or trained as stale), ``duplicated``
= trained more than once; both must be 0.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import typer

from shared.cli_options import from_options, opt

log = logging.getLogger(__name__)

FAULT_KINDS = ("rollout", "reward", "trainer", "redis")


@dataclass(frozen=True)
class Fault:
    kind: str  # a stack process name, or "redis"
    iteration: int
    at: float  # point in the iteration's pipeline, as a fraction of the baseline's pipeline time


def fault_schedule(iterations: int, seed: int, kinds: tuple[str, ...] = FAULT_KINDS, per_kind: int = 1) -> list[Fault]:
    """Every kind ``per_kind`` times, dealt round-robin over the iterations in a seeded random order, each
    at a uniformly random point in (0.05, 0.95) of its iteration; sorted by (iteration, at)."""
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if per_kind < 1 or not kinds:
        raise ValueError("a chaos schedule needs at least one kind of fault, injected at least once")
    unknown = sorted(set(kinds) - set(FAULT_KINDS))
    if unknown:
        raise ValueError(f"unknown fault kind(s) {unknown}; known: {', '.join(FAULT_KINDS)}")
    rng = random.Random(seed)
    pool = [kind for kind in kinds for _ in range(per_kind)]
    rng.shuffle(pool)
    faults = [Fault(kind, i % iterations, round(rng.uniform(0.05, 0.95), 3)) for i, kind in enumerate(pool)]
    return sorted(faults, key=lambda f: (f.iteration, f.at))


def due_faults(pending: list[Fault], iteration: int, elapsed_s: float, window_s: float) -> list[Fault]:
    """The pending faults of ``iteration`` whose point (``at`` x ``window_s``) has passed."""
    return [f for f in pending if f.iteration == iteration and f.at * window_s <= elapsed_s]


def account(published: dict[int, set[str]], trained: dict[int, list[str]]) -> dict[str, int]:
    """Samples published and trained, and how many were lost (published, never trained) or duplicated
    (trained more than once), over every iteration."""
    lost = sum(len(ids - set(trained.get(it, []))) for it, ids in published.items())
    duplicated = sum(len(ids) - len(set(ids)) for ids in trained.values())
    return {
        "samples_published": sum(len(ids) for ids in published.values()),
        "samples_trained": sum(len(ids) for ids in trained.values()),
        "lost": lost,
        "duplicated": duplicated,
    }


class FaultInjector:
    """Fires the schedule against a stack: a thread checks every ``tick_s`` which faults are due in the
    iteration the run is in (``begin``); ``finish`` fires what is left of it. A target that is down (being
    restarted) is not killed again: its fault waits until it is back."""

    def __init__(self, stack, faults: list[Fault], window_s: float, tick_s: float = 0.2):
        self.stack = stack
        self.pending = list(faults)
        self.window_s = window_s
        self.tick_s = tick_s
        self.injected: Counter[str] = Counter()
        self.log: list[dict] = []
        self._iteration: int | None = None
        self._started = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-injector", daemon=True)

    def start(self) -> "FaultInjector":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def begin(self, iteration: int) -> None:
        with self._lock:
            self._iteration, self._started = iteration, time.monotonic()

    def finish(self, iteration: int) -> None:
        """The iteration's pipeline is done: fire its faults not yet due (waiting for a target that is down)."""
        while True:
            with self._lock:
                self._iteration = None
                left = [f for f in self.pending if f.iteration == iteration]
                for fault in left:
                    self._fire(fault)
            if not any(f.iteration == iteration for f in self.pending):
                return
            time.sleep(self.tick_s)

    def _run(self) -> None:
        while not self._stop.wait(self.tick_s):
            with self._lock:
                if self._iteration is None:
                    continue
                for fault in due_faults(self.pending, self._iteration, time.monotonic() - self._started, self.window_s):
                    self._fire(fault)

    def _alive(self, kind: str) -> bool:
        if kind == "redis":
            return self.stack.redis is not None and self.stack.redis.alive()
        process = self.stack.processes.get(kind)
        return process is not None and process.alive()

    def _fire(self, fault: Fault) -> None:
        if not self._alive(fault.kind):
            return
        elapsed = time.monotonic() - self._started
        self.stack.kill(fault.kind)
        self.pending.remove(fault)
        self.injected[fault.kind] += 1
        self.log.append({"kind": fault.kind, "iteration": fault.iteration, "at": fault.at, "elapsed_s": round(elapsed, 1)})
        log.warning("event=fault_injected kind=%s iteration=%d at=%.2f elapsed_s=%.1f", fault.kind, fault.iteration,
                    fault.at, elapsed)  # fmt: skip


@dataclass
class ChaosOptions:
    iterations: int = opt(3, "iterations of each run (the baseline and the chaos run)")
    queries: int = opt(2, "K: queries per iteration")
    responses: int = opt(2, "m: responses per query")
    seed: int = opt(0, "seed of the fault schedule and of the runs")
    out_dir: Path = opt(Path("runs/bench/chaos"), "stack, runs, adapters and chaos.json go here")
    stage_timeout_s: float = opt(900.0, cli=False)


def _run_class():
    """SemiOnlineRun with hooks: the pipeline time of each iteration, and the injector told where it is."""
    from services.orchestrator.loop import BASE_LABEL, SemiOnlineRun

    class ChaosRun(SemiOnlineRun):
        def __init__(self, *args, stack=None, injector: FaultInjector | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            self.stack, self.injector = stack, injector
            self.pipeline_s: list[float] = []
            self._started, self._current = 0.0, 0

        def _iteration(self, iteration: int) -> None:
            self._started, self._current = time.monotonic(), iteration
            if self.injector is not None:
                self.injector.begin(iteration)
            super()._iteration(iteration)

        def _evaluate(self, label: str) -> None:
            if label != BASE_LABEL:  # the pipeline of the iteration has finished: its adapter is served
                self.pipeline_s.append(time.monotonic() - self._started)
                if self.injector is not None:
                    self.injector.finish(self._current)
            if self.stack is not None:
                self.stack.wait_healthy()
            super()._evaluate(label)

    return ChaosRun


def _supervise(stack, stop: threading.Event, errors: list[BaseException]) -> None:
    while not stop.wait(0.5):
        try:
            stack.restart_dead(max_restarts=20)
        except Exception as exc:  # noqa: BLE001 - reported by the bench, which then fails
            errors.append(exc)
            return


def published_and_trained(redis_url: str, adapter_root: Path, run_id: str) -> tuple[dict[int, set[str]], dict[int, list[str]]]:
    """Per iteration: the sample ids on the samples stream, and those the trainer recorded with the adapter."""
    import redis

    from shared.schemas import STREAM_SAMPLES, WeightedSample, decode_message

    client = redis.Redis.from_url(redis_url)
    published: dict[int, set[str]] = {}
    for _, fields in client.xrange(STREAM_SAMPLES):
        try:
            payload = decode_message(fields)
        except ValueError:
            continue
        if isinstance(payload, WeightedSample) and payload.run_id == run_id:
            published.setdefault(payload.iteration, set()).add(payload.sample_id)
    client.close()
    trained: dict[int, list[str]] = {}
    for state_file in sorted((adapter_root / run_id).glob("iter-*/trainer_state.json")):
        state = json.loads(state_file.read_text())
        trained[int(state["iteration"])] = list(state["sample_ids"])
    return published, trained


def run_chaos(options: ChaosOptions) -> dict:
    from rich.console import Console

    from services.orchestrator.loop import RunOptions
    from services.orchestrator.stack import LocalStack, StackConfig
    from shared.runs import RunConfig
    from shared.tiny_models import ensure_model_set

    out = Path(options.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    models = ensure_model_set("tiny")
    stack = LocalStack(StackConfig(
        stack_dir=out / "stack",
        services=("rollout", "reward", "trainer"),
        common={"policy_model": str(models.policy), "general_model": str(models.general),
                "domain_model": str(models.domain), "embedding_model": str(models.embedding),
                "adapter_root": str(out / "adapters"), "run_root": str(out / "runs")},
        per_service={
            "rollout": {"max_tokens": 64, "generation_max_tokens": 64, "generation_attempts": 2},
            # short takeover times: a killed consumer's pending entries and locks pass on in seconds
            "reward": {"min_idle_ms": 5000, "lock_ttl_ms": 10000},
            "trainer": {"lora_rank": 8, "lora_alpha": 16, "batch_size": 4, "min_idle_ms": 5000, "lock_ttl_s": 30},
        },
    ))  # fmt: skip
    console = Console(stderr=True)
    ChaosRun = _run_class()
    tag = f"{int(time.time())}"
    faults = fault_schedule(options.iterations, options.seed)
    stop, errors = threading.Event(), []
    info = stack.up()
    supervisor = threading.Thread(target=_supervise, args=(stack, stop, errors), name="chaos-supervisor", daemon=True)
    supervisor.start()
    injector = None
    try:

        def one_run(run_id: str, injector: FaultInjector | None):
            config = RunConfig(run_id=run_id, iterations=options.iterations, queries_per_iteration=options.queries,
                               responses_per_query=options.responses, seed=options.seed)  # fmt: skip
            run_options = RunOptions(config=config, run_dir=out / "runs" / run_id, eval_limit=1, eval_max_tokens=32,
                                     stage_timeout_s=options.stage_timeout_s)  # fmt: skip
            run = ChaosRun(run_options, info, console, stack=stack, injector=injector)
            started = time.perf_counter()
            run.run()
            return run, time.perf_counter() - started

        baseline, baseline_s = one_run(f"chaos-baseline-{tag}", None)
        window_s = sum(baseline.pipeline_s) / len(baseline.pipeline_s)
        injector = FaultInjector(stack, faults, window_s).start()
        chaos, chaos_s = one_run(f"chaos-{tag}", injector)
        if errors:
            raise errors[0]
        published, trained = published_and_trained(info.redis_url, out / "adapters", chaos.config.run_id)
        result = {
            "faults_injected": {kind: injector.injected.get(kind, 0) for kind in FAULT_KINDS},
            "iterations_planned": options.iterations,
            "iterations_completed": len(chaos.state.trained),
            **account(published, trained),
            "slowdown": round(chaos_s / baseline_s, 3),
            "seconds": {"baseline": round(baseline_s, 1), "chaos": round(chaos_s, 1)},
            "baseline_pipeline_s": round(window_s, 1),
            "restarts": dict(stack.restarts),
            "faults": injector.log,
            "config": {"iterations": options.iterations, "K": options.queries, "m": options.responses, "seed": options.seed},
        }
    finally:
        if injector is not None:
            injector.stop()
        stop.set()
        supervisor.join(timeout=10)
        stack.down()
    (out / "chaos.json").write_text(json.dumps(result, indent=2))
    return result


@from_options(ChaosOptions)
def bench(options: ChaosOptions) -> None:
    """SIGKILL rollout (vLLM included), reward, trainer and Redis during a run on the tiny stack; last line JSON."""
    if options.iterations < 1 or options.queries < 1 or options.responses < 2:
        raise typer.BadParameter("need --iterations >= 1, --queries >= 1 and --responses >= 2 (a group needs two)")
    result = run_chaos(options)
    typer.echo(json.dumps(result))
    if result["lost"] or result["duplicated"] or result["iterations_completed"] < options.iterations:
        raise typer.Exit(1)
