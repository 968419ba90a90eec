"""Prometheus metrics of the reward service (one registry per app, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Telemetry:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("grace_reward_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram(
            "grace_reward_request_seconds", "scoring request latency", ["route"], registry=r,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        )  # fmt: skip
        self.responses = Counter("grace_reward_responses", "responses scored, by parsed", ["parsed"], registry=r)
        self.in_flight = Gauge("grace_reward_in_flight", "scoring jobs computing now", registry=r)
        self.waiting = Gauge("grace_reward_waiting", "scoring requests waiting for a slot", registry=r)
        self.rejected = Counter("grace_reward_rejected", "requests answered 503 (queue full or models loading)", registry=r)
        self.ready = Gauge("grace_reward_ready", "1 once the models are loaded", registry=r)
        self.tokens = Counter("grace_reward_model_tokens", "tokens through the models, by model", ["model"], registry=r)
        self.flops = Counter("grace_reward_model_flops", "matmul FLOPs of the scoring forward passes", registry=r)
        self.groups_scored = Counter("grace_reward_worker_groups", "rollout groups scored by the worker", registry=r)
        self.samples_published = Counter("grace_reward_worker_samples", "weighted samples published", registry=r)
        self.iterations = Counter("grace_reward_worker_iterations", "iterations finalized by this process", registry=r)
        self.worker_errors = Counter("grace_reward_worker_errors", "worker batches that failed", registry=r)
