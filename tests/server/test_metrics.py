"""Metrics in themselves: what each recording method publishes, and that none can break a request."""

from __future__ import annotations

import logging
import math

import pytest

from server.metrics import Metrics


def test_exits_accumulate_the_compute_fraction() -> None:
    metrics = Metrics()
    metrics.samples_exited("m", 0, 3, executed_flops=300.0, full_flops=1200.0)
    metrics.samples_exited("m", 3, 1, executed_flops=400.0, full_flops=400.0)
    metrics.samples_exited("m", 1, 0, executed_flops=0.0, full_flops=0.0)  # nothing answered: no series
    value = metrics.registry.get_sample_value
    assert value("offramp_samples_total", {"model": "m"}) == 4
    assert value("offramp_exit_stage_total", {"model": "m", "stage": "0"}) == 3
    assert value("offramp_exit_stage_total", {"model": "m", "stage": "1"}) is None
    assert value("offramp_compute_fraction", {"model": "m"}) == pytest.approx(700 / 1600)


def test_policy_gauges_show_disabled_exits_as_nan() -> None:
    metrics = Metrics()
    metrics.policy("m", 4, [0.9, None])
    value = metrics.registry.get_sample_value
    assert value("offramp_exit_policy_version", {"model": "m"}) == 4
    assert value("offramp_exit_threshold", {"model": "m", "stage": "0"}) == 0.9
    assert math.isnan(value("offramp_exit_threshold", {"model": "m", "stage": "1"}))


def test_shadow_agreement_is_the_share_that_agrees() -> None:
    metrics = Metrics()
    metrics.shadow("m", 10, 1)
    metrics.shadow("m", 10, 3)
    assert metrics.registry.get_sample_value("offramp_shadow_agreement", {"model": "m"}) == pytest.approx(0.8)


def test_registries_are_independent() -> None:
    a, b = Metrics(), Metrics()
    a.request_done("m", "ok", 0.01)
    assert a.registry.get_sample_value("offramp_requests_total", {"model": "m", "outcome": "ok"}) == 1
    assert b.registry.get_sample_value("offramp_requests_total", {"model": "m", "outcome": "ok"}) is None


def test_a_failing_recording_is_logged_and_swallowed(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    with caplog.at_level(logging.ERROR, logger="offramp.metrics"):
        metrics.stage_run("m", 0, batch=1, seconds="slow")  # type: ignore[arg-type]
    assert any("stage_run failed" in r.message for r in caplog.records)
