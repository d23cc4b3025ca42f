"""Calibration: targets met on the calibration data, never costlier than one global threshold."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.bundle import Calibration, load_bundle
from server.control.calibrate import available_criteria, calibrate, frontier, simulate
from server.control.calibrate_cli import register
from server.exits import ExitState, advance, softmax


def synthetic(
    seed: int, stages: int = 6, samples: int = 300, classes: int = 10, extras: bool = False
) -> Calibration:
    """Exits that grow surer with depth, with hard samples that confuse the early ones."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, samples)
    hardness = rng.uniform(0, 1, samples)
    rows = np.arange(samples)
    logits = np.empty((stages, samples, classes), np.float32)
    for s in range(stages):
        z = rng.normal(0, 1, (samples, classes))
        z[rows, labels] += (s + 1) / stages * 6 * (1.2 - hardness)
        z[rows, rng.integers(0, classes, samples)] += rng.uniform(0, 3, samples) * hardness
        logits[s] = z
    gate = similarity = None
    if extras:
        gate = rng.uniform(0, 1, (stages, samples)).astype(np.float32)
        similarity = rng.uniform(0.3, 1, (stages, samples)).astype(np.float32)
        similarity[0] = np.nan
    return Calibration(labels=labels.astype(np.int64), logits=logits, gate=gate, similarity=similarity)


def best_global(calib: Calibration, criterion: str, flops: list[int], quality: str, target: float) -> float:
    """Brute force: the least compute of any single threshold shared by all exits meeting the target."""
    num_stages, n = calib.logits.shape[:2]
    state, scores, labels = ExitState.initial(n), [], []
    for s in range(num_stages - 1):
        gate = None if calib.gate is None else calib.gate[s]
        sim = None if calib.similarity is None else calib.similarity[s]
        score, label, state = advance(criterion, calib.logits[s], state, gate, sim)
        scores.append(score)
        labels.append(label)
    final = softmax(calib.logits[-1]).argmax(-1)
    labels.append(final)
    scores_arr, labels_arr = np.array(scores), np.array(labels)
    reference = final if quality == "agreement" else calib.labels
    cost = np.cumsum(flops) / sum(flops)
    best = 1.0  # every exit disabled: full depth
    if quality == "accuracy" and (final == calib.labels).mean() < target:
        best = np.inf
    for cut in np.unique(scores_arr[np.isfinite(scores_arr)]):
        hit = scores_arr >= cut
        stage = np.where(hit.any(0), hit.argmax(0), num_stages - 1)
        if (labels_arr[stage, np.arange(n)] == reference).mean() >= target:
            best = min(best, cost[stage].mean())
    return best


CRITERIA = ["max_prob", "margin", "entropy", "patience", "gate", "q_exit", "similarity"]


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_meets_agreement_target_and_beats_global_threshold(criterion: str, seed: int) -> None:
    calib = synthetic(seed, extras=True)
    flops = [10, 30, 10, 20, 10, 40]
    result = calibrate(calib, flops, target_agreement=0.97, criterion=criterion)
    assert result.report.agreement >= 0.97
    assert result.report.compute_fraction <= best_global(calib, criterion, flops, "agreement", 0.97) + 1e-12
    # The reported figures are what replaying the thresholds gives.
    assert result.report == simulate(calib, criterion, result.thresholds, flops)


def test_per_exit_thresholds_save_compute_over_one_global_threshold() -> None:
    calib = synthetic(3, stages=8, samples=400)
    result = calibrate(calib, [100] * 8, target_agreement=0.97)
    assert result.report.compute_fraction < result.global_report.compute_fraction - 0.02
    assert len(set(result.thresholds)) > 1


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000), stages=st.integers(2, 5), samples=st.integers(5, 80),
    target=st.floats(0.5, 1.0), quality=st.sampled_from(["agreement", "accuracy"]),
    criterion=st.sampled_from(["max_prob", "entropy", "patience", "margin"]),
)
def test_property_target_met_and_never_worse_than_global(
    seed: int, stages: int, samples: int, target: float, quality: str, criterion: str
) -> None:
    calib = synthetic(seed, stages=stages, samples=samples, classes=3)
    flops = list(np.random.default_rng(seed).integers(1, 50, stages))
    reference = best_global(calib, criterion, flops, quality, target)
    try:
        result = calibrate(calib, flops, criterion=criterion, **{f"target_{quality}": target})
    except ValueError:
        assert reference == np.inf  # only unreachable when no global threshold reaches it either
        return
    assert getattr(result.report, quality) >= target - 1e-12
    assert result.report.compute_fraction <= reference + 1e-12


def test_compute_budget_gives_best_agreement_within_budget() -> None:
    calib = synthetic(4)
    flops = [1] * 6
    result = calibrate(calib, flops, compute_budget=0.5)
    assert result.report.compute_fraction <= 0.5
    assert result.report.agreement >= result.global_report.agreement
    assert result.global_report.compute_fraction <= 0.5
    with pytest.raises(ValueError, match="compute_budget 0.1 cannot be met"):
        calibrate(calib, flops, compute_budget=0.1)  # stage 0 alone costs 1/6


@pytest.mark.parametrize("seed", [4, 5, 6])
def test_compute_budget_can_maximise_accuracy_instead(seed: int) -> None:
    """`offramp compare`'s objective: the best accuracy within the budget (ground truth labels),
    never below what the agreement objective's thresholds reach, nor the best single threshold's."""
    calib, flops = synthetic(seed), [1] * 6
    by_accuracy = calibrate(calib, flops, compute_budget=0.5, budget_objective="accuracy")
    by_agreement = calibrate(calib, flops, compute_budget=0.5)
    assert by_accuracy.report.compute_fraction <= 0.5
    assert by_accuracy.report.accuracy >= by_agreement.report.accuracy
    assert by_accuracy.report.accuracy >= by_accuracy.global_report.accuracy
    assert by_agreement.report.agreement >= by_accuracy.report.agreement
    with pytest.raises(ValueError, match="budget_objective must be agreement or accuracy"):
        calibrate(calib, flops, compute_budget=0.5, budget_objective="speed")


def test_simulate_replays_the_engine_decisions() -> None:
    # 3 stages, 2 classes: sample 0 is sure at stage 0, sample 1 at stage 1, sample 2 never.
    logits = np.array([
        [[5, 0], [0, 0.2], [0, 0.1]],
        [[5, 0], [4, 0], [0, 0.1]],
        [[5, 0], [4, 0], [3, 0]],
    ], np.float32)
    calib = Calibration(labels=np.array([0, 0, 1]), logits=logits)
    report = simulate(calib, "max_prob", [0.9, 0.9], [1, 2, 3])
    assert report.exit_counts == [1, 1, 1]
    assert report.compute_fraction == pytest.approx((1 + 3 + 6) / 18)
    assert report.agreement == 1.0 and report.accuracy == pytest.approx(2 / 3)
    full = simulate(calib, "max_prob", [None, None], [1, 2, 3])
    assert full.exit_counts == [0, 0, 3] and full.compute_fraction == 1.0


def test_patience_thresholds_are_integers() -> None:
    result = calibrate(synthetic(5), [1] * 6, target_agreement=0.95, criterion="patience")
    assert all(t is None or isinstance(t, int) for t in result.thresholds)


def test_criteria_needing_missing_arrays_are_refused() -> None:
    with pytest.raises(ValueError, match="needs the calibration array 'gate'"):
        calibrate(synthetic(0), [1] * 6, target_agreement=0.9, criterion="gate")
    with pytest.raises(ValueError, match="exactly one"):
        calibrate(synthetic(0), [1] * 6, target_agreement=0.9, compute_budget=0.5)


def test_frontier_runs_from_cheap_to_full_depth() -> None:
    calib = synthetic(6)
    points = frontier(calib, [1] * 6, "max_prob")
    assert points[-1][0] == 1.0 and points[-1][1] == 1.0
    assert points[0][0] < 0.5 and len(points) >= 5


# -- the real tiny bundle -----------------------------------------------------------------------


def test_tiny_bundle_calibrates_for_every_available_criterion(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    calib = bundle.calibration()
    for criterion in available_criteria(bundle.manifest, calib):
        result = calibrate(calib, bundle.manifest, target_agreement=0.99, criterion=criterion)
        flops = [s.flops for s in bundle.manifest.stages]
        assert result.report.agreement >= 0.99
        reference = best_global(calib, criterion, flops, "agreement", 0.99)
        assert result.report.compute_fraction <= reference + 1e-12


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="offramp")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_prints_plots_and_writes_default(tiny_bundle: Path, tmp_path: Path, capsys) -> None:
    pytest.importorskip("matplotlib")
    bundle_dir = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle_dir)
    plot = tmp_path / "frontier.png"
    code = _cli(["calibrate", str(bundle_dir), "--target-agreement", "0.99", "--plot", str(plot),
                 "--write-default"])
    out = capsys.readouterr().out
    assert code == 0
    assert "max_prob" in out and "best:" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = load_bundle(bundle_dir).manifest  # hashes still verify
    assert f"{manifest.default_policy.criterion}" in out.split("default policy written")[1]
    replay = simulate(load_bundle(bundle_dir).calibration(), manifest.default_policy.criterion,
                      manifest.default_policy.thresholds, manifest)
    assert replay.agreement >= 0.99


def test_cli_without_matplotlib_says_how_to_get_it(tiny_bundle: Path, tmp_path: Path, monkeypatch,
                                                  capsys) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    code = _cli(["calibrate", str(tiny_bundle), "--compute-budget", "0.8", "--criterion", "max_prob",
                 "--plot", str(tmp_path / "x.png")])
    assert code == 2
    assert "offramp[export]" in capsys.readouterr().err
    assert json.loads((tiny_bundle / "manifest.json").read_text())  # untouched and readable


def test_cli_refuses_unknown_criterion(tiny_bundle: Path, capsys) -> None:
    assert _cli(["calibrate", str(tiny_bundle), "--target-agreement", "0.9", "--criterion", "nope"]) == 2
    assert "not available" in capsys.readouterr().err
