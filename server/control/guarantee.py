"""Thresholds with a guarantee: agreement (or accuracy) >= target with probability >= confidence.

`calibrate` (calibrate.py) picks the cheapest thresholds whose agreement on the calibration
samples meets the target: a point estimate on the very samples it was fitted to, which new
traffic misses (the demo: 99.3 % agreement on validation, 96.9 % on test). `guaranteed` wraps it
in **Learn then Test** (Angelopoulos, Bates, Candès, Jordan, Lei 2021, "Learn then Test:
Calibrating Predictive Algorithms to Achieve Risk Control", https://arxiv.org/abs/2110.01052)
with fixed-sequence testing:

1. The calibration samples are split at random (seeded) into a *fit* part and a *test* part.
2. On the fit part, a path of candidate policies ordered from safe to cheap: `calibrate` at
   in-sample targets from 1.0 down past the target (per-exit thresholds). A second family needs no
   fitting: one threshold shared by every exit, on a fixed grid over the criterion's score range,
   from strict to loose; it is tested on *all* samples. The two families share the error budget
   (Bonferroni: `1 - confidence` split in two).
3. Each candidate j, in order, is tested on its test samples: with d disagreements among n, the
   p-value of "its true disagreement rate exceeds 1 - target" is P(Binomial(n, 1 - target) <= d).
   Candidates are certified while p <= the family's error budget; the first failure stops the
   family. The cheapest certified candidate (least compute on the samples it was tested on) is chosen; with
   none certified every exit is disabled, which meets any agreement target (full depth agrees
   with itself).

Guarantee: if future samples are exchangeable with the calibration samples, the chosen policy's
agreement (accuracy) is >= target with probability >= confidence over the draw of the calibration
data (fixed-sequence testing controls the family-wise error; the fit part never touches the test
part). The price is conservatism: with n test samples, 0 disagreements certify 1 - target only if
target^n <= (1 - confidence) / 2, so 99 % at 95 % confidence needs at least 368 test samples; below that
the early exits of the per-exit family stay off, and only the shared-threshold family (all samples)
can open them. Reports give the chosen policy's figures on the test part (never used to fit it) with a
Clopper-Pearson interval at the same confidence; the same samples also chose among the certified
candidates, so these figures lean optimistic: the guarantee is the certification, not the interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from server.bundle import Calibration, Manifest
from server.control.calibrate import PolicyReport, calibrate, simulate, stage_flops
from server.exits import lookup

CONFIDENCE = 0.95
FIT_SHARE = 0.5
PATH_TARGETS = 12  # in-sample targets on the fit part, from 1.0 down past the target
GRID = 48  # shared thresholds tested, strict to loose


def binomial_cdf(d: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= d), summed in log space (exact for the sizes calibration has)."""
    if d >= n:
        return 1.0
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0  # d < n here
    k = np.arange(d + 1, dtype=np.float64)
    from math import lgamma

    logs = np.array([lgamma(n + 1) - lgamma(i + 1) - lgamma(n - i + 1) for i in k]) + k * np.log(p) + (
        n - k) * np.log1p(-p)
    top = logs.max()
    return float(min(1.0, np.exp(top) * np.exp(logs - top).sum()))


def clopper_pearson(successes: int, n: int, confidence: float) -> tuple[float, float]:
    """Two-sided Clopper-Pearson interval of a binomial proportion, by bisection on the exact cdf."""
    if n == 0:
        return 0.0, 1.0
    alpha = 1.0 - confidence

    def solve(f, lo: float, hi: float) -> float:  # noqa: ANN001 - f is monotone in p
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if f(mid) else (lo, mid)
        return 0.5 * (lo + hi)

    # lower: largest p with P(X >= successes | p) <= alpha / 2
    lower = 0.0 if successes == 0 else solve(
        lambda p: 1.0 - binomial_cdf(successes - 1, n, p) <= alpha / 2, 0.0, successes / n)
    upper = 1.0 if successes == n else solve(
        lambda p: binomial_cdf(successes, n, p) > alpha / 2, successes / n, 1.0)
    return lower, upper


def subset(calibration: Calibration, rows: np.ndarray) -> Calibration:
    """The calibration data of some samples only."""
    return Calibration(
        labels=calibration.labels[rows], logits=calibration.logits[:, rows],
        gate=None if calibration.gate is None else calibration.gate[:, rows],
        similarity=None if calibration.similarity is None else calibration.similarity[:, rows])


@dataclass(frozen=True)
class GuaranteedResult:
    """Thresholds certified by Learn then Test, and how they did on their test samples."""

    criterion: str
    target: str  # target_agreement or target_accuracy
    value: float
    confidence: float
    thresholds: list[float | None]
    family: str  # "per-exit" (fitted on the fit part), "shared" (grid), or "full-depth" (nothing certified)
    certified: bool
    fit_samples: int
    test_samples: int
    held_out: PolicyReport  # the chosen policy on the test part (not fitted on; it did help choose)
    interval: tuple[float, float]  # Clopper-Pearson interval of the held-out agreement / accuracy
    candidates_certified: int
    seed: int

    def to_dict(self) -> dict:
        d = asdict(self)
        d["interval"] = list(self.interval)
        d["method"] = "learn-then-test (fixed sequence, Bonferroni over two families), Clopper-Pearson report"
        return d


def _quality(report: PolicyReport, target: str) -> float:
    return report.accuracy if target == "target_accuracy" else report.agreement


def _fixed_sequence(candidates: list[list[float | None]], test: Calibration, criterion: str, flops: list[int],
                    target: str, value: float, alpha: float) -> list[tuple[list[float | None], PolicyReport]]:
    """The certified prefix of `candidates` (in their order) on `test`."""
    certified = []
    n = int(test.labels.shape[0])
    for thresholds in candidates:
        report = simulate(test, criterion, thresholds, flops)
        failures = int(round((1.0 - _quality(report, target)) * n))
        if binomial_cdf(failures, n, 1.0 - value) > alpha:
            break
        certified.append((thresholds, report))
    return certified


def _shared_grid(criterion: str, k: int) -> list[list[float | None]]:
    """One threshold for every exit, strict to loose, on a grid that does not look at the data."""
    info = lookup(criterion)
    lo, hi = info.threshold_range(k + 1)
    if info.integer:  # patience: a count of agreeing exits
        values = [float(t) for t in range(int(hi), int(lo) - 1, -1)]
    else:
        values = [float(v) for v in np.linspace(hi, lo, GRID)]
    if criterion == "entropy":  # exits when the entropy is at most the threshold: strict is low
        values = values[::-1]
    return [[v] * k for v in values]


def guaranteed(calibration: Calibration, manifest_or_flops: Manifest | Sequence[float], *,
               target_agreement: float | None = None, target_accuracy: float | None = None,
               confidence: float = CONFIDENCE, criterion: str = "max_prob", seed: int = 0) -> GuaranteedResult:
    """Per-exit thresholds certified to meet the target with probability >= `confidence` (module doc)."""
    given = {k: v for k, v in (("target_agreement", target_agreement), ("target_accuracy", target_accuracy))
             if v is not None}
    if len(given) != 1:
        raise ValueError("give exactly one of target_agreement, target_accuracy")
    (target, value), = given.items()
    if not 0.0 < value < 1.0:
        raise ValueError(f"{target} must be in (0, 1), got {value}")
    if not 0.5 <= confidence < 1.0:
        raise ValueError(f"confidence must be in [0.5, 1), got {confidence}")
    flops = stage_flops(manifest_or_flops)
    k = len(flops) - 1
    n = int(calibration.labels.shape[0])
    order = np.random.default_rng(seed).permutation(n)
    fit_rows, test_rows = np.sort(order[: int(n * FIT_SHARE)]), np.sort(order[int(n * FIT_SHARE):])
    fit, test = subset(calibration, fit_rows), subset(calibration, test_rows)
    alpha = (1.0 - confidence) / 2  # two families

    full: list[float | None] = [None] * k
    # Full depth agrees with itself for certain; its accuracy is a random quantity, tested first.
    path: list[list[float | None]] = [full] if target == "target_accuracy" else []
    for t in np.linspace(1.0, max(0.5, value - 0.03), PATH_TARGETS):
        try:
            thresholds = calibrate(fit, flops, criterion=criterion, **{target: float(t)}).thresholds  # type: ignore[arg-type]
        except ValueError:  # unreachable on the fit part
            continue
        if thresholds not in path:
            path.append(thresholds)
    per_exit = _fixed_sequence(path, test, criterion, flops, target, value, alpha)
    shared = _fixed_sequence(_shared_grid(criterion, k), calibration, criterion, flops, target, value,
                             alpha)
    options = [("per-exit", t, r) for t, r in per_exit] + [("shared", t, r) for t, r in shared]
    if not options:
        report = simulate(test, criterion, full, flops)
        if target == "target_accuracy":  # not even full depth passed its test
            raise ValueError(f"{target} {value} cannot be certified at confidence {confidence}: full depth's "
                             f"accuracy on the test part is {report.accuracy:.4f}")
        family, thresholds, held = "full-depth", full, report
    else:
        # The cheapest certified candidate (shared ones measured on all samples, per-exit on the test part).
        family, thresholds, held = min(options, key=lambda o: o[2].compute_fraction)
        if family == "shared":  # report every family on the same test part
            held = simulate(test, criterion, thresholds, flops)
    successes = int(round(_quality(held, target) * len(test_rows)))
    return GuaranteedResult(
        criterion=criterion, target=target, value=value, confidence=confidence, thresholds=list(thresholds),
        family=family, certified=family != "full-depth", fit_samples=len(fit_rows), test_samples=len(test_rows),
        held_out=held, interval=clopper_pearson(successes, len(test_rows), confidence),
        candidates_certified=len(options), seed=seed)
