"""Calibration with a guarantee (server/control/guarantee.py) on synthetic scores whose truth is known."""

from __future__ import annotations

import numpy as np
import pytest

from server.bundle import Calibration
from server.control.calibrate import calibrate, simulate
from server.control.guarantee import binomial_cdf, clopper_pearson, guaranteed, subset

FLOPS = [100, 100, 100]


def population(n: int, seed: int) -> Calibration:
    """Two classes, three stages. At each early exit the max-prob score p ~ U(0.5, 1) is calibrated:
    the exit agrees with the final label with probability p, so the truth of any policy is known
    from a large sample."""
    rng = np.random.default_rng(seed)
    final = rng.integers(0, 2, n)
    logits = np.zeros((3, n, 2), np.float32)
    logits[2, np.arange(n), final] = 5.0
    for s in range(2):
        p = rng.uniform(0.5, 1.0, n)
        agree = rng.random(n) < p
        predicted = np.where(agree, final, 1 - final)
        logits[s, np.arange(n), predicted] = np.log(p)
        logits[s, np.arange(n), 1 - predicted] = np.log1p(-p + 1e-9)
    return Calibration(labels=final.astype(np.int64), logits=logits)


@pytest.fixture(scope="module")
def truth() -> Calibration:
    return population(200_000, seed=12345)


def test_binomial_and_clopper_pearson_match_known_values() -> None:
    assert binomial_cdf(0, 299, 0.01) == pytest.approx(0.99**299)
    assert binomial_cdf(3, 10, 0.5) == pytest.approx(176 / 1024)
    lo, hi = clopper_pearson(95, 100, 0.95)
    assert lo == pytest.approx(0.8872, abs=1e-3) and hi == pytest.approx(0.9836, abs=1e-3)  # the textbook figures
    assert clopper_pearson(100, 100, 0.95)[1] == 1.0 and clopper_pearson(0, 50, 0.95)[0] == 0.0


def test_the_guarantee_holds_over_many_draws_and_the_point_estimate_does_not(truth: Calibration) -> None:
    target, confidence, draws = 0.95, 0.9, 40
    met_certified = met_point = 0
    savings = []
    for d in range(draws):
        calib = population(600, seed=d)
        certified = guaranteed(calib, FLOPS, target_agreement=target, confidence=confidence, seed=d)
        point = calibrate(calib, FLOPS, target_agreement=target)
        true_certified = simulate(truth, "max_prob", certified.thresholds, FLOPS)
        met_certified += true_certified.agreement >= target
        met_point += simulate(truth, "max_prob", point.thresholds, FLOPS).agreement >= target
        savings.append(1 - true_certified.compute_fraction)
        lo, hi = certified.interval
        assert lo <= certified.held_out.agreement <= hi
    # P(a draw fails) <= 0.1: 40 draws fail more than 8 times with probability < 0.02 (seeds fixed).
    assert met_certified >= draws - 8, met_certified
    assert met_point < met_certified  # in-sample thresholds miss the target more often (here rarely)
    assert np.mean(savings) > 0.05  # and the guarantee still saves compute on this population


def test_too_few_samples_to_certify_means_full_depth() -> None:
    calib = population(100, seed=1)  # 0.99 at 95 % needs at least 368 test samples
    result = guaranteed(calib, FLOPS, target_agreement=0.99, confidence=0.95)
    assert result.family == "full-depth" and not result.certified and result.thresholds == [None, None]
    assert result.held_out.agreement == 1.0


def test_patience_and_entropy_are_certified_too(truth: Calibration) -> None:
    calib = population(4000, seed=3)
    for criterion in ("entropy", "margin", "patience"):
        result = guaranteed(calib, FLOPS, target_agreement=0.9, confidence=0.9, criterion=criterion)
        assert result.certified, criterion
        assert simulate(truth, criterion, result.thresholds, FLOPS).agreement >= 0.9  # on fresh samples
        assert result.fit_samples + result.test_samples == 4000


def test_accuracy_targets_and_bad_arguments(truth: Calibration) -> None:
    calib = population(2000, seed=4)
    result = guaranteed(calib, FLOPS, target_accuracy=0.9, confidence=0.9)
    assert result.target == "target_accuracy" and result.certified
    assert simulate(truth, "max_prob", result.thresholds, FLOPS).accuracy >= 0.9  # on fresh samples
    with pytest.raises(ValueError, match="cannot be certified"):
        guaranteed(subset(calib, np.arange(200)), FLOPS, target_accuracy=0.9999, confidence=0.95)
    with pytest.raises(ValueError, match="exactly one"):
        guaranteed(calib, FLOPS, confidence=0.9)
    with pytest.raises(ValueError, match="confidence"):
        guaranteed(calib, FLOPS, target_agreement=0.9, confidence=1.0)
