"""Prometheus metrics of the reward service (one registry per app, so tests can run several)."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shared.group_health import GroupHealth
from shared.schemas import METRIC_SYMBOLS

# Group-health gauges hold the last batch measured by each source: "iteration" (the worker's last finalized
# iteration) and "request" (the last /v1/score or /get_reward call).
HEALTH_SOURCES = ("iteration", "request")


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
        self.health_groups = Gauge("grace_reward_health_groups", "groups in the last batch measured", ["source"], registry=r)
        self.zero_variance_share = Gauge(
            "grace_reward_zero_variance_share", "share of groups with no ranking signal (< 2 parsed or all Z = 0)",
            ["source"], registry=r,
        )  # fmt: skip
        self.parse_rate = Gauge("grace_reward_parse_rate", "share of responses parsed", ["source"], registry=r)
        self.truncation_rate = Gauge(
            "grace_reward_truncation_rate", "share of responses cut by the token limit (finish_reason 'length'), "
            "among those whose finish_reason is known", ["source"], registry=r,
        )  # fmt: skip
        self.metric_mean = Gauge(
            "grace_reward_metric_mean", "mean of a metric over parsed responses", ["source", "metric"], registry=r
        )
        self.metric_std = Gauge(
            "grace_reward_metric_std", "population std of a metric over parsed responses", ["source", "metric"], registry=r
        )
        self.health_iteration = Gauge("grace_reward_health_iteration", "iteration of the source='iteration' gauges", registry=r)

    def record_health(self, source: str, health: GroupHealth) -> None:
        """Sets the group-health gauges of ``source`` to one batch's figures; one the batch cannot give (no
        finish reason known, no parsed response) is NaN, so no gauge shows an older batch's value."""
        if source not in HEALTH_SOURCES:
            raise ValueError(f"health source must be one of {HEALTH_SOURCES}, not {source!r}")
        self.health_groups.labels(source).set(health.groups)
        for gauge, value in (
            (self.zero_variance_share, health.zero_variance_share),
            (self.parse_rate, health.parse_rate),
            (self.truncation_rate, health.truncation_rate),
        ):
            gauge.labels(source).set(math.nan if value is None else value)
        for symbol in METRIC_SYMBOLS:
            self.metric_mean.labels(source, symbol).set(health.metric_mean.get(symbol, math.nan))
            self.metric_std.labels(source, symbol).set(health.metric_std.get(symbol, math.nan))
