"""Calibration: pick per-exit thresholds from held-out data that meet a target at the least compute.

Everything here is pure numpy on `calibration.npz` (no torch, no onnxruntime), so the running
server can recalibrate on request and `offramp calibrate` can do it offline.

Every criterion's scores are independent of the thresholds (patience counts every exit whether
it is enabled or not), so the scores of all early exits are computed once with `exits.advance`
and a threshold vector maps each sample to its first exit whose score passes. The search:

1. the best single global threshold, exactly, over every distinct score (a sweep of the points
   where a sample's exit stage changes);
2. a Lagrangian sweep: for a range of prices of agreement in compute, coordinate descent over
   each exit's threshold minimising `compute - price * quality` (per exit, every distinct score is
   a candidate and one prefix sum evaluates them all);
3. constrained coordinate descent from the best of those, using any slack left.

The best point found is kept, so the result never costs more than the best global threshold.
Compute is counted in integer FLOPs, so comparisons are exact. `simulate` then replays the chosen
policy stage by stage through `exits.decide`, exactly as the engine runs it, and its figures are
what gets reported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from server.bundle import Calibration, Manifest
from server.exits import CRITERIA, Criterion, ExitState, advance, softmax, threshold_range
from server.replay import check_replayable, replay, stage_array

TARGETS = ("target_agreement", "target_accuracy", "compute_budget")
_PRICES = tuple(float(p) for p in np.geomspace(1e-3, 1e3, 36))
_PLOT_PRICES = tuple(float(p) for p in np.geomspace(1e-3, 1e3, 120))


def available_criteria(manifest: Manifest, calibration: Calibration | None = None) -> list[str]:
    """Criteria this bundle's stages can serve (and, given calibration data, calibrate): every one
    whose stage output exists at some early exit and at all early exits from its first stage on."""
    n = manifest.num_stages

    def usable(info: Criterion) -> bool:
        if info.reads is None:
            return True
        return (info.first_stage < n - 1 and not info.missing_at(lambda k, o: manifest.stages[k].has_output(o), n)
                and (calibration is None or getattr(calibration, info.reads) is not None))

    return [name for name, info in CRITERIA.items() if usable(info)]


@dataclass(frozen=True)
class PolicyReport:
    """Expected behaviour of a policy on the calibration data."""

    criterion: str
    thresholds: list[float | None]
    samples: int
    exit_counts: list[int]  # samples answered at each stage, the last stage included
    exit_histogram: list[float]  # the same as fractions
    compute_fraction: float  # expected executed FLOPs over full-depth FLOPs
    agreement: float  # share of answers equal to the final stage's label
    accuracy: float  # share of answers equal to the true label
    mean_exit_stage: float
    exit_agreement: list[float | None] = field(default_factory=list)  # per stage, among its answers

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class CalibrationResult:
    """Chosen per-exit thresholds with their expected figures, and the best global threshold's."""

    criterion: str
    target: str  # one of TARGETS
    value: float
    thresholds: list[float | None]
    report: PolicyReport
    global_threshold: float | None
    global_report: PolicyReport

    def to_dict(self) -> dict:
        return {
            "criterion": self.criterion,
            "target": {self.target: self.value},
            "thresholds": self.thresholds,
            "expected": self.report.to_dict(),
            "global_threshold": {
                "threshold": self.global_threshold, "expected": self.global_report.to_dict(),
            },
        }


def stage_flops(manifest_or_flops: Manifest | Sequence[float]) -> list[int]:
    """Per-stage FLOPs from a manifest or a list, refusing a model whose stages cost nothing."""
    flops = [s.flops for s in manifest_or_flops.stages] if isinstance(manifest_or_flops, Manifest) else list(
        manifest_or_flops)
    if not flops or any(f < 0 for f in flops) or sum(flops) <= 0:
        raise ValueError(f"per-stage FLOPs must be non-negative with a positive total, got {flops}")
    return [int(round(f)) for f in flops]


def simulate(
    calibration: Calibration,
    criterion: str,
    thresholds: Sequence[float | None],
    flops_per_stage: Manifest | Sequence[float],
) -> PolicyReport:
    """Replay a policy on the calibration data stage by stage, as the engine runs it."""
    flops = stage_flops(flops_per_stage)
    num_stages = len(flops)
    n = calibration.labels.shape[0]
    stage_of, answer = replay(calibration, criterion, thresholds, num_stages)
    final = softmax(calibration.logits[-1]).argmax(axis=-1)
    counts = np.bincount(stage_of, minlength=num_stages)
    cumulative = np.cumsum(flops)
    return PolicyReport(
        criterion=criterion,
        thresholds=list(thresholds),
        samples=n,
        exit_counts=counts.tolist(),
        exit_histogram=(counts / n).tolist(),
        compute_fraction=float(cumulative[stage_of].sum() / (n * cumulative[-1])),
        agreement=float((answer == final).mean()),
        accuracy=float((answer == calibration.labels).mean()),
        mean_exit_stage=float(stage_of.mean()),
        exit_agreement=[float((answer[stage_of == s] == final[stage_of == s]).mean()) if counts[s] else None
                        for s in range(num_stages)],
    )


class _Search:
    """The calibration data of one criterion in the form the threshold search needs."""

    def __init__(self, calibration: Calibration, criterion: str, flops: list[int], quality: str):
        num_stages = len(flops)
        check_replayable(calibration, criterion, num_stages)
        self.criterion, self.k, self.n = criterion, num_stages - 1, calibration.labels.shape[0]
        state = ExitState.initial(self.n)
        scores = np.empty((self.k, self.n))
        labels = np.empty((num_stages, self.n), np.int64)
        for s in range(self.k):
            scores[s], labels[s], state = advance(
                criterion, calibration.logits[s], state,
                stage_array(calibration.gate, s), stage_array(calibration.similarity, s),
            )
        labels[-1] = softmax(calibration.logits[-1]).argmax(axis=-1)
        reference = labels[-1] if quality == "agreement" else calibration.labels
        self.good = (labels == reference).astype(np.int64)  # [S, N]: answer at stage s is good
        self.cost = np.cumsum(flops).astype(np.int64)  # FLOPs spent by a sample answered at stage s
        # Scores are clipped into the valid threshold range so every candidate cut is a valid threshold.
        lo, hi = threshold_range(criterion, num_stages)
        lo_s, hi_s = (-hi, -lo) if criterion == "entropy" else (lo, hi)
        self.scores = np.where(np.isfinite(scores), np.clip(scores, lo_s, hi_s), -np.inf)
        self.order = np.argsort(-self.scores, axis=1, kind="stable")
        self.sorted = np.take_along_axis(self.scores, self.order, axis=1)
        self.rows = np.arange(self.n)

    def threshold(self, cut: float) -> float | None:
        """User-facing threshold of a score cut (+inf: exit disabled)."""
        if not math.isfinite(cut):
            return None
        if self.criterion == "patience":
            return int(cut)
        return -cut if self.criterion == "entropy" else cut

    def exits(self, cuts: np.ndarray) -> np.ndarray:
        if self.k == 0:
            return np.zeros(self.n, np.int64)
        hit = self.scores >= cuts[:, None]
        return np.where(hit.any(axis=0), hit.argmax(axis=0), self.k)

    def totals(self, cuts: np.ndarray) -> tuple[int, int]:
        stage = self.exits(cuts)
        return int(self.cost[stage].sum()), int(self.good[stage, self.rows].sum())

    def candidates(self, cuts: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every cut for exit k with the others fixed, and the (cost, good) totals of each.

        The first candidate disables the exit; the rest are the distinct finite scores, descending.
        """
        others = cuts.copy()
        others[k] = np.inf
        after = self.exits(others)  # where each sample answers when exit k is off
        base_cost, base_good = int(self.cost[after].sum()), int(self.good[after, self.rows].sum())
        idx = self.order[k]
        reach = after[idx] >= k
        alt = after[idx]
        d_cost = np.where(reach, self.cost[k] - self.cost[alt], 0).cumsum()
        d_good = np.where(reach, self.good[k, idx] - self.good[alt, idx], 0).cumsum()
        vals = self.sorted[k]
        ends = np.flatnonzero(np.isfinite(vals) & np.append(vals[1:] < vals[:-1], True))
        return (np.concatenate([[np.inf], vals[ends]]), base_cost + np.concatenate([[0], d_cost[ends]]),
                base_good + np.concatenate([[0], d_good[ends]]))

    def global_candidates(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every single threshold shared by all exits, as score cuts, with their (cost, good) totals.

        As the cut falls, a sample's exit moves to an earlier stage exactly when the cut passes a new
        running maximum of its scores; each such record is one event.
        """
        prev = np.vstack([np.full((1, self.n), -np.inf), np.maximum.accumulate(self.scores, axis=0)[:-1]])
        record = self.scores > prev
        nxt = np.full((self.k, self.n), self.k)
        for s in range(self.k - 2, -1, -1):
            nxt[s] = np.where(record[s + 1], s + 1, nxt[s + 1])
        ks, ns = np.nonzero(record)
        values = self.scores[ks, ns]
        alt = nxt[ks, ns]
        order = np.argsort(-values, kind="stable")
        values, ks, ns, alt = values[order], ks[order], ns[order], alt[order]
        d_cost = (self.cost[ks] - self.cost[alt]).cumsum()
        d_good = (self.good[ks, ns] - self.good[alt, ns]).cumsum()
        ends = np.flatnonzero(np.append(values[1:] < values[:-1], True)) if len(values) else np.zeros(0, int)
        base_cost, base_good = self.n * int(self.cost[-1]), int(self.good[-1].sum())
        return (np.concatenate([[np.inf], values[ends]]), base_cost + np.concatenate([[0], d_cost[ends]]),
                base_good + np.concatenate([[0], d_good[ends]]))


class _Goal:
    """Ranks (cost, good) totals: feasible first, then the objective, then the tie-break."""

    def __init__(self, target: str, value: float, search: _Search):
        self.target = target
        if target == "compute_budget":
            self.limit = math.floor(value * search.n * int(search.cost[-1]) * (1 + 1e-12))
        else:
            self.need = math.ceil(value * search.n - 1e-9)

    def keys(self, cost: np.ndarray, good: np.ndarray) -> tuple[np.ndarray, ...]:
        if self.target == "compute_budget":
            return np.maximum(cost - self.limit, 0), -good, cost
        return np.maximum(self.need - good, 0), cost, -good

    def best(self, cost: np.ndarray, good: np.ndarray) -> int:
        primary, secondary, tertiary = self.keys(cost, good)
        return int(np.lexsort((tertiary, secondary, primary))[0])

    def key(self, cost: int, good: int) -> tuple[int, ...]:
        return tuple(int(x[0]) for x in self.keys(np.array([cost]), np.array([good])))


def _descend(search: _Search, cuts: np.ndarray, pick, max_passes: int = 50) -> np.ndarray:
    """Coordinate descent: set each exit's cut to `pick`'s choice among its candidates until stable.

    `pick(values, cost, good, current_totals)` returns a candidate index, or None to keep the cut.
    """
    cuts = cuts.copy()
    for _ in range(max_passes):
        changed = False
        for k in range(search.k):
            values, cost, good = search.candidates(cuts, k)
            choice = pick(values, cost, good, search.totals(cuts))
            if choice is not None and values[choice] != cuts[k]:
                cuts[k], changed = values[choice], True
        if not changed:
            break
    return cuts


def _lagrangian(search: _Search, cuts: np.ndarray, price: float) -> np.ndarray:
    """Per-exit cuts minimising compute - price * quality (both as fractions), from `cuts`."""
    scale = price * int(search.cost[-1])
    return _descend(search, cuts, lambda v, c, q, cur: int(np.argmin(c - scale * q)), max_passes=10)


def _constrained(search: _Search, goal: _Goal, cuts: np.ndarray) -> np.ndarray:
    """Per-exit cuts improved one exit at a time while the goal's ranking improves."""

    def pick(values: np.ndarray, cost: np.ndarray, good: np.ndarray, current: tuple[int, int]) -> int | None:
        choice = goal.best(cost, good)
        return choice if goal.key(int(cost[choice]), int(good[choice])) < goal.key(*current) else None

    return _descend(search, cuts, pick)


def calibrate(
    calibration: Calibration,
    manifest_or_flops: Manifest | Sequence[float],
    *,
    target_agreement: float | None = None,
    target_accuracy: float | None = None,
    compute_budget: float | None = None,
    criterion: str = "max_prob",
    budget_objective: str = "agreement",
) -> CalibrationResult:
    """Per-exit thresholds meeting exactly one target at the least expected compute.

    `target_agreement` / `target_accuracy`: least compute with agreement with the final stage's
    label / accuracy at least the target. `compute_budget`: best agreement (`budget_objective`
    "accuracy": best accuracy) within that fraction of full-depth FLOPs. Raises ValueError when
    the target cannot be met on the calibration data.
    """
    asked = (target_agreement, target_accuracy, compute_budget)
    given = {k: v for k, v in zip(TARGETS, asked, strict=True) if v is not None}
    if len(given) != 1:
        raise ValueError(f"give exactly one of {', '.join(TARGETS)}")
    (target, value), = given.items()
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{target} must be in (0, 1], got {value}")
    flops = stage_flops(manifest_or_flops)
    if budget_objective not in ("agreement", "accuracy"):
        raise ValueError(f"budget_objective must be agreement or accuracy, got {budget_objective!r}")
    accuracy = target == "target_accuracy" or (target == "compute_budget" and budget_objective == "accuracy")
    quality = "accuracy" if accuracy else "agreement"
    search = _Search(calibration, criterion, flops, quality)
    goal = _Goal(target, value, search)

    values, cost, good = search.global_candidates()
    g = goal.best(cost, good)
    global_cut, best_cuts = float(values[g]), np.full(search.k, values[g])
    best_key = goal.key(int(cost[g]), int(good[g]))
    starts, cuts = [best_cuts], np.full(search.k, np.inf)
    for price in _PRICES if search.k else ():
        cuts = _lagrangian(search, cuts, price)
        starts.append(cuts)
    for start in starts:
        polished = _constrained(search, goal, start)
        key = goal.key(*search.totals(polished))
        if key < best_key:
            best_key, best_cuts = key, polished
    if best_key[0] != 0:
        best = simulate(calibration, criterion, [search.threshold(float(c)) for c in best_cuts], flops)
        raise ValueError(_unreachable(target, value, criterion, best))

    # A cut above every score an exit produced never fires: say so with null.
    top: Any = np.where(np.isfinite(search.sorted[:, 0]), search.sorted[:, 0], -np.inf) if search.k else []
    thresholds = [None if c > t else search.threshold(float(c)) for c, t in zip(best_cuts, top, strict=True)]
    global_thresholds = [search.threshold(global_cut)] * search.k
    return CalibrationResult(
        criterion=criterion, target=target, value=value, thresholds=thresholds,
        report=simulate(calibration, criterion, thresholds, flops),
        global_threshold=search.threshold(global_cut),
        global_report=simulate(calibration, criterion, global_thresholds, flops),
    )


def _unreachable(target: str, value: float, criterion: str, best: PolicyReport) -> str:
    if target == "compute_budget":
        return (f"compute_budget {value} cannot be met with {criterion}: the cheapest policy found needs "
                f"{best.compute_fraction:.3f} of full-depth compute")
    what = "agreement" if target == "target_agreement" else "accuracy"
    return (f"{target} {value} cannot be met with {criterion} on the calibration data: "
            f"the best reachable {what} is {getattr(best, what):.4f}")


def frontier(
    calibration: Calibration, flops: Manifest | Sequence[float], criterion: str
) -> list[tuple[float, float, float]]:
    """(compute fraction, agreement, accuracy) of per-exit policies along the agreement/compute trade-off.

    Each point is the Lagrangian optimum for one price of agreement in compute, sorted by compute.
    """
    per_stage = stage_flops(flops)
    search = _Search(calibration, criterion, per_stage, "agreement")
    cuts = np.full(search.k, np.inf)
    seen: dict[tuple[float, ...], PolicyReport] = {}
    for price in (*_PLOT_PRICES, math.inf):
        cuts = np.full(search.k, np.inf) if math.isinf(price) else _lagrangian(search, cuts, price)
        key = tuple(float(c) for c in cuts)
        if key not in seen:
            thresholds = [search.threshold(c) for c in key]
            seen[key] = simulate(calibration, criterion, thresholds, per_stage)
    points = {(r.compute_fraction, r.agreement, r.accuracy) for r in seen.values()}
    return sorted(points)
