"""Prometheus metrics (prefix `offramp_`). The registry is injected so tests see fresh counters.

Instrumentation never breaks a request: every recording method logs and swallows its own errors.
"""

from __future__ import annotations

import functools
import logging
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

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


class _Histogram:
    """Bucket counts, sum and count of one label set (the buckets end with +Inf)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds, self.counts, self.sum = bounds, [0] * (len(bounds) + 1), 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), total))
        return out


class StageTally(Collector):
    """What the engine records after every stage run, kept in plain Python under one lock and turned
    into Prometheus families only when /metrics is scraped: recording costs a few hundred
    nanoseconds instead of the microseconds of prometheus_client's per-sample bookkeeping.

    Exposes offramp_stage_latency_seconds and offramp_batch_size (histograms per model and stage),
    offramp_exit_stage_total (per model and stage), offramp_samples_total, offramp_executed_flops_total,
    offramp_full_depth_flops_total and offramp_compute_fraction (per model)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latency: dict[tuple[str, str], _Histogram] = {}
        self._batch: dict[tuple[str, str], _Histogram] = {}
        self._exits: dict[tuple[str, str], int] = {}
        self._flops: dict[str, list[float]] = {}  # model -> [samples, executed, full depth]

    def stage_run(self, model: str, stage: int, batch: int, seconds: float) -> None:
        key = (model, str(stage))
        with self._lock:
            latency = self._latency.get(key)
            if latency is None:
                latency = self._latency[key] = _Histogram(LATENCY_BUCKETS)
                self._batch[key] = _Histogram(BATCH_BUCKETS)
            latency.observe(seconds)
            self._batch[key].observe(batch)

    def exited(self, model: str, stage: int, count: int, executed: float, full: float) -> None:
        if count <= 0:
            return
        key = (model, str(stage))
        with self._lock:
            self._exits[key] = self._exits.get(key, 0) + count
            totals = self._flops.setdefault(model, [0, 0.0, 0.0])
            totals[0] += count
            totals[1] += executed
            totals[2] += full

    def collect(self) -> Iterator[Any]:
        with self._lock:
            latency = {k: (h.buckets(), h.sum) for k, h in self._latency.items()}
            batch = {k: (h.buckets(), h.sum) for k, h in self._batch.items()}
            exits, flops = dict(self._exits), {m: list(t) for m, t in self._flops.items()}
        for name, doc, table in (
            ("offramp_stage_latency_seconds", "Compute time of one stage run on one batch.", latency),
            ("offramp_batch_size", "Samples per stage run.", batch),
        ):
            family = HistogramMetricFamily(name, doc, labels=["model", "stage"])
            for key, (buckets, total) in table.items():
                family.add_metric(list(key), buckets, total)
            yield family
        family = CounterMetricFamily("offramp_exit_stage", "Samples answered at each stage (0-based).",
                                     labels=["model", "stage"])
        for key, count in exits.items():
            family.add_metric(list(key), count)
        yield family
        per_model = (
            ("offramp_samples", "Samples answered.", 0),
            ("offramp_executed_flops", "FLOPs executed by answered samples.", 1),
            ("offramp_full_depth_flops", "FLOPs the answered samples would have cost at full depth.", 2),
        )
        for name, doc, i in per_model:
            family = CounterMetricFamily(name, doc, labels=["model"])
            for model, totals in flops.items():
                family.add_metric([model], totals[i])
            yield family
        gauge = GaugeMetricFamily("offramp_compute_fraction",
                                  "Executed FLOPs over full-depth FLOPs, cumulative since start (1.0 means no saving).",
                                  labels=["model"])
        for model, totals in flops.items():
            if totals[2] > 0:
                gauge.add_metric([model], totals[1] / totals[2])
        yield gauge


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
        self.queue_depth = Gauge(
            "offramp_queue_depth", "Samples waiting for each stage.", ["model", "stage"], registry=r,
        )
        self.stages = StageTally()  # the per-stage figures the worker records: collected on scrape
        r.register(self.stages)
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
        self.window_samples = Gauge(
            "offramp_window_samples", "Traced samples in the live calibration window.", ["model"], registry=r)
        self.live_agreement = Gauge(
            "offramp_live_agreement", "Agreement of the live policy with full depth on the live window.", ["model"],
            registry=r)
        self.live_agreement_lower = Gauge(
            "offramp_live_agreement_lower",
            "One-sided lower confidence bound of offramp_live_agreement (at the auto-calibration confidence).",
            ["model"], registry=r)
        self.live_exit_agreement = Gauge(
            "offramp_live_exit_agreement", "Live agreement among the window samples the live policy answers at each "
            "stage (NaN: none).", ["model", "stage"], registry=r)
        self.window_shadow_flops = Gauge(
            "offramp_window_shadow_flops", "FLOPs spent running traced samples on after their answer (cumulative).",
            ["model"], registry=r)
        self.auto_changes = Counter(
            "offramp_auto_calibrations", "Policy changes made by auto-recalibration.", ["model", "action"],
            registry=r)
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
        self.stages.stage_run(model, stage, batch, seconds)

    @_never_raises
    def samples_exited(self, model: str, stage: int, count: int, executed_flops: float, full_flops: float) -> None:
        self.stages.exited(model, stage, count, executed_flops, full_flops)

    @_never_raises
    def stage_done(self, model: str, stage: int, batch: int, seconds: float, answered: int, executed_flops: float,
                   full_flops: float) -> None:
        """`stage_run` and `samples_exited` of one stage run in one call (the direct path's)."""
        self.stages.stage_run(model, stage, batch, seconds)
        self.stages.exited(model, stage, answered, executed_flops, full_flops)

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
    def live_window(self, model: str, live: dict[str, Any]) -> None:
        self.window_samples.labels(model).set(live.get("window_samples", 0))
        self.window_shadow_flops.labels(model).set(live.get("shadow_flops", 0.0))
        if "agreement" in live:
            self.live_agreement.labels(model).set(live["agreement"])
            self.live_agreement_lower.labels(model).set(live["agreement_lower"])
            for stage, a in enumerate(live.get("exit_agreement", [])):
                self.live_exit_agreement.labels(model, str(stage)).set(float("nan") if a is None else a)

    @_never_raises
    def auto_change(self, model: str, action: str) -> None:
        self.auto_changes.labels(model, action).inc()

    @_never_raises
    def shadow(self, model: str, checked: int, disagreements: int) -> None:
        if checked <= 0:
            return
        self.shadow_checked.labels(model).inc(checked)
        self.shadow_disagreements.labels(model).inc(disagreements)
        total = self.shadow_checked.labels(model)._value.get()
        bad = self.shadow_disagreements.labels(model)._value.get()
        self.shadow_agreement.labels(model).set(1.0 - bad / total)
