"""Prometheus metrics (prefix `offramp_`). The registry is injected so tests see fresh counters.

Instrumentation never breaks a request: every recording method logs and swallows its own errors.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

log = logging.getLogger("offramp.metrics")

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

F = TypeVar("F", bound=Callable[..., Any])


def _never_raises(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception:  # instrumentation must not break a request
            log.exception("metrics: %s failed", fn.__name__)
            return None

    return wrapper  # type: ignore[return-value]


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.requests = Counter(
            "offramp_requests", "Inference requests by outcome (ok, bad_request, overloaded, timeout, error).",
            ["model", "outcome"], registry=r,
        )
        self.request_latency = Histogram(
            "offramp_request_latency_seconds", "End-to-end latency of successful inference requests.",
            ["model"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.samples = Counter("offramp_samples", "Samples answered.", ["model"], registry=r)
        self.exit_stage = Counter(
            "offramp_exit_stage", "Samples answered at each stage (0-based).", ["model", "stage"], registry=r,
        )
        self.stage_latency = Histogram(
            "offramp_stage_latency_seconds", "Compute time of one stage run on one batch.",
            ["model", "stage"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "offramp_batch_size", "Samples per stage run.", ["model", "stage"], buckets=BATCH_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge(
            "offramp_queue_depth", "Samples waiting for each stage.", ["model", "stage"], registry=r,
        )
        self.executed_flops = Counter(
            "offramp_executed_flops", "FLOPs executed by answered samples.", ["model"], registry=r,
        )
        self.full_depth_flops = Counter(
            "offramp_full_depth_flops", "FLOPs the answered samples would have cost at full depth.", ["model"],
            registry=r,
        )
        self.compute_fraction = Gauge(
            "offramp_compute_fraction",
            "Executed FLOPs over full-depth FLOPs, cumulative since start (1.0 means no saving).",
            ["model"], registry=r,
        )
        self.exit_threshold = Gauge(
            "offramp_exit_threshold", "Live exit threshold per early exit (NaN: exit disabled).",
            ["model", "stage"], registry=r,
        )
        self.policy_version = Gauge(
            "offramp_exit_policy_version", "Version of the live exit policy.", ["model"], registry=r,
        )
        self.shadow_agreement = Gauge(
            "offramp_shadow_agreement",
            "Share of shadow-checked early exits whose label agrees with full depth.", ["model"], registry=r,
        )
        self.shadow_checked = Counter(
            "offramp_shadow_checked", "Early-exited samples re-run to full depth for checking.", ["model"],
            registry=r,
        )
        self.shadow_disagreements = Counter(
            "offramp_shadow_disagreements", "Shadow-checked early exits that disagree with full depth.",
            ["model"], registry=r,
        )
        self.policy_store_up = Gauge(
            "offramp_policy_store_up",
            "1 while the policy store answers, 0 while it does not (this replica keeps its last policy).",
            ["store"], registry=r,
        )

    def _child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, cached: prometheus_client's lookup costs microseconds, and the
        worker records several metrics per stage run."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    @_never_raises
    def request_done(self, model: str, outcome: str, latency_s: float | None = None) -> None:
        self.requests.labels(model, outcome).inc()
        if latency_s is not None and outcome == "ok":
            self.request_latency.labels(model).observe(latency_s)

    @_never_raises
    def stage_run(self, model: str, stage: int, batch: int, seconds: float) -> None:
        self._child(self.stage_latency, model, str(stage)).observe(seconds)
        self._child(self.batch_size, model, str(stage)).observe(batch)

    @_never_raises
    def samples_exited(self, model: str, stage: int, count: int, executed_flops: float, full_flops: float) -> None:
        if count <= 0:
            return
        executed = self._child(self.executed_flops, model)
        full = self._child(self.full_depth_flops, model)
        self._child(self.samples, model).inc(count)
        self._child(self.exit_stage, model, str(stage)).inc(count)
        executed.inc(executed_flops)
        full.inc(full_flops)
        if full._value.get() > 0:
            self._child(self.compute_fraction, model).set(executed._value.get() / full._value.get())

    @_never_raises
    def queue(self, model: str, stage: int, depth: int) -> None:
        self._child(self.queue_depth, model, str(stage)).set(depth)

    @_never_raises
    def policy(self, model: str, version: int, thresholds: list[float | None]) -> None:
        self.policy_version.labels(model).set(version)
        for stage, t in enumerate(thresholds):
            self.exit_threshold.labels(model, str(stage)).set(float("nan") if t is None else float(t))

    @_never_raises
    def store_up(self, store: str, up: bool) -> None:
        self.policy_store_up.labels(store).set(1.0 if up else 0.0)

    @_never_raises
    def shadow(self, model: str, checked: int, disagreements: int) -> None:
        if checked <= 0:
            return
        self.shadow_checked.labels(model).inc(checked)
        self.shadow_disagreements.labels(model).inc(disagreements)
        total = self.shadow_checked.labels(model)._value.get()
        bad = self.shadow_disagreements.labels(model)._value.get()
        self.shadow_agreement.labels(model).set(1.0 - bad / total)
