"""Conformal prediction sets per exit, as JEI-DNN serves them (networkslab/dynn,
`src/conformal_eedn.py`: `compute_conf_threshold`, `get_conf_thresh`, `get_pred_sets`).

The score of a calibration sample at stage s is 1 - p_s(true label). For coverage 1 - alpha, the
quantile q_s is the empirical quantile at level ceil((n + 1)(1 - alpha)) / n (numpy's "higher") of
the scores of the n calibration samples that **exit at s under the live policy**, so that coverage
holds among the answers each exit gives; with `min_exit_samples` or fewer exiting there, of every
calibration sample's score at s (dynn: `MIN_POINTS_FOR_CONF = 20`). A sample answered at stage s
gets the set {c : p_s(c) >= 1 - q_s}. Requests with `early_exit` false are answered at the last
stage, so theirs uses every sample's score there.

Deliberate deviation: where that level exceeds 1 (too few samples for the coverage asked), dynn
clips it to the largest score; here the quantile is infinite and the set is every class, the
conformal answer (the promise holds; the set says the exit cannot tell).

Pure numpy over the bundle's `calibration.npz`; the quantiles of a policy are computed once and
cached (a live policy change computes new ones on first use).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from server.bundle import Bundle, Calibration, ConformalSpec
from server.exits import softmax
from server.policy import ExitPolicy
from server.replay import replay


def quantile(scores: np.ndarray, coverage: float) -> float:
    """dynn's `get_conf_thresh`: +inf when ceil((n + 1) * coverage) > n (no finite quantile promises it)."""
    n = len(scores)
    level = math.ceil((n + 1) * coverage) / n if n else math.inf
    return math.inf if level > 1 else float(np.quantile(scores, level, method="higher"))


def exit_quantiles(calibration: Calibration, spec: ConformalSpec,
                   policy: tuple[str, Sequence[float | None]] | None) -> np.ndarray:
    """q_s for every stage s (float64 [S]) under `policy` (criterion, thresholds); None: every
    sample answered at the last stage (full depth)."""
    num_stages = calibration.logits.shape[0]
    n = calibration.labels.shape[0]
    stage_of = (np.full(n, num_stages - 1, np.int64) if policy is None
                else replay(calibration, policy[0], policy[1])[0])
    rows = np.arange(n)
    out = np.empty(num_stages)
    for s in range(num_stages):
        scores = 1.0 - softmax(calibration.logits[s])[rows, calibration.labels]
        here = scores[stage_of == s]
        out[s] = quantile(here if len(here) > spec.min_exit_samples else scores, spec.coverage)
    return out


def sets_from(probabilities: np.ndarray, exit_stage: np.ndarray, quantiles: np.ndarray) -> np.ndarray:
    """bool [N, C]: class c is in sample i's set when its probability at its exit is >= 1 - q."""
    floor = 1.0 - quantiles[np.asarray(exit_stage, np.int64)]
    return np.asarray(probabilities) >= floor[:, None]


@lru_cache(maxsize=64)
def _bundle_quantiles(bundle: Bundle, policy: tuple[str, tuple[float | None, ...]] | None) -> np.ndarray:
    assert bundle.manifest.conformal is not None
    return exit_quantiles(bundle.calibration(), bundle.manifest.conformal, policy)


def policy_quantiles(bundle: Bundle, policy: ExitPolicy | None) -> np.ndarray:
    """The bundle's exit quantiles under `policy` (None: full depth), computed once per policy.
    ValueError when the bundle has no conformal calibration (`manifest.conformal`) or the policy
    cannot be replayed on its calibration data."""
    if bundle.manifest.conformal is None:
        raise ValueError(f"model {bundle.name!r} has no conformal calibration (manifest `conformal`)")
    return _bundle_quantiles(bundle, None if policy is None else (policy.criterion, tuple(policy.thresholds)))

