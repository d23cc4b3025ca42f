"""Exit criteria: pure numpy functions of one stage's outputs and per-sample state.

Every criterion turns a stage's outputs into one *score* per sample, higher meaning "surer", and a
sample may exit at an early stage when `score >= threshold` (for entropy, when the normalised
entropy is `<= threshold`; its score is the negated entropy). A threshold of `None` disables that
exit. The last stage always answers.

- `max_prob`: largest softmax probability (MET, LGViT).
- `margin`: top-1 minus top-2 softmax probability.
- `entropy`: entropy of the softmax divided by log(C), in [0, 1] (BranchyNet). DeeBERT thresholds
  the entropy in nats: its threshold S corresponds to ours S / ln(C).
- `patience`: number of consecutive exits, this one included, that predicted the same label;
  exit when it reaches the threshold, an integer. PABEE counts the exits *after* the first that
  agree with it: PABEE's patience t is our threshold t + 1.
- `similarity`: cosine similarity of the hidden state before and after the stage, head-free (MuE).
- `gate`: the stage's learned exit probability (JEI-DNN style gate).
- `q_exit`: cumulative exit probability 1 - prod_j (1 - gate_j) over the stages so far (PALBERT).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# The stage outputs a criterion may read besides the logits (the names are the bundle format's).
GATE = "gate"
SIMILARITY = "similarity"


@dataclass(frozen=True)
class Criterion:
    """What the server knows of one criterion. `CRITERIA` is the one table that policy validation,
    calibration and the scheduler read."""

    name: str
    reads: str | None = None  # the stage output it needs besides the logits (`gate`, `similarity`)
    first_stage: int = 0  # the first stage that must have that output (similarity: older bundles lack it at 0)
    integer: bool = False  # thresholds are whole numbers (patience)
    lo: float = 0.0  # valid thresholds, inclusive; `hi` None means the number of stages
    hi: float | None = 1.0
    stateful: bool = False  # its score depends on earlier stages (carried in ExitState)

    def threshold_range(self, num_stages: int) -> tuple[float, float]:
        return self.lo, float(num_stages) if self.hi is None else self.hi

    def missing_at(self, has_output: Callable[[int, str], bool], num_stages: int) -> list[int]:
        """The early exits (stage indices) that lack the output this criterion reads."""
        if self.reads is None:
            return []
        return [k for k in range(self.first_stage, num_stages - 1) if not has_output(k, self.reads)]


CRITERIA: dict[str, Criterion] = {c.name: c for c in (
    Criterion("max_prob"),
    Criterion("margin"),
    Criterion("entropy"),
    Criterion("patience", integer=True, lo=1.0, hi=None, stateful=True),
    Criterion("gate", reads=GATE),
    Criterion("q_exit", reads=GATE, stateful=True),
    Criterion("similarity", reads=SIMILARITY, first_stage=1, lo=-1.0, hi=1.0),
)}


def lookup(name: str) -> Criterion:
    """The table entry of a criterion; `ValueError` naming the known ones for any other name."""
    try:
        return CRITERIA[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown criterion {name!r}; choose one of {list(CRITERIA)}") from None


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float32, copy=False)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def threshold_range(name: str, num_stages: int) -> tuple[float, float]:
    """Valid thresholds (inclusive) for a criterion."""
    return lookup(name).threshold_range(num_stages)


def validate_thresholds(name: str, thresholds: list[float | None], num_stages: int) -> list[str]:
    """Problems with a threshold list for a model of `num_stages` stages (empty when valid)."""
    try:
        info = lookup(name)
    except ValueError as err:
        return [str(err)]
    problems = []
    if len(thresholds) != num_stages - 1:
        problems.append(f"expected {num_stages - 1} thresholds (one per early exit), got {len(thresholds)}")
    lo, hi = info.threshold_range(num_stages)
    for i, t in enumerate(thresholds):
        if t is None:
            continue
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not np.isfinite(t):
            problems.append(f"threshold {i} must be a number or null, got {t!r}")
        elif not lo <= t <= hi:
            problems.append(f"threshold {i} = {t} is outside [{lo:g}, {hi:g}] for {name}")
        elif info.integer and float(t) != int(t):
            problems.append(f"threshold {i} = {t}: {name} takes an integer")
    return problems


@dataclass(frozen=True)
class ExitState:
    """Per-sample state carried from stage to stage (rows follow the samples)."""

    prev_label: np.ndarray  # int64 [N], -1 before the first stage
    run: np.ndarray  # int32 [N], consecutive exits with the same label so far
    survive: np.ndarray  # float64 [N], probability of not having exited so far (q_exit)

    @classmethod
    def initial(cls, n: int) -> ExitState:
        return cls(np.full(n, -1, np.int64), np.zeros(n, np.int32), np.ones(n, np.float64))

    def __len__(self) -> int:
        return len(self.prev_label)

    def take(self, rows: np.ndarray) -> ExitState:
        return ExitState(self.prev_label[rows], self.run[rows], self.survive[rows])

    @staticmethod
    def concat(states: list[ExitState]) -> ExitState:
        return ExitState(
            np.concatenate([s.prev_label for s in states]),
            np.concatenate([s.run for s in states]),
            np.concatenate([s.survive for s in states]),
        )


def advance(
    criterion: str,
    logits: np.ndarray | None,
    state: ExitState,
    gate: np.ndarray | None = None,
    similarity: np.ndarray | None = None,
    probs: np.ndarray | None = None,
    stage: int | None = None,
    labels: np.ndarray | None = None,
    max_prob: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, ExitState]:
    """Scores of one stage for every sample, the predicted labels, and the updated state.

    The state is updated whether or not this exit is enabled (patience counts every exit).
    `probs` (`softmax(logits)`), `labels` (their argmax) and `max_prob` (their max), when the caller
    already has them (computed in the stage graph, server.engine.runtime.with_exit_scores), spare
    computing them again; then `logits` may be None. Before the criterion's `first_stage` (given
    `stage`) the output it reads does not exist: nobody exits there.
    """
    info = lookup(criterion)
    if info.reads is not None and {GATE: gate, SIMILARITY: similarity}[info.reads] is None:
        if stage is None or stage >= info.first_stage:
            raise ValueError(f"criterion {criterion!r} needs a stage output {info.reads!r}")
        similarity = np.full(len(state), np.nan, np.float32)  # only similarity starts after stage 0
    if probs is None:
        assert logits is not None, "advance needs the logits or their softmax"
        probs = softmax(logits)
    labels = probs.argmax(axis=-1).astype(np.int64) if labels is None else labels.astype(np.int64, copy=False)
    same = labels == state.prev_label
    run = np.where(same, state.run + 1, 1).astype(np.int32)
    survive = state.survive
    if criterion == "max_prob":
        score = probs.max(axis=-1) if max_prob is None else max_prob
    elif criterion == "margin":
        top2 = np.partition(probs, -2, axis=-1)[:, -2:] if probs.shape[-1] > 1 else np.concatenate(
            [np.zeros_like(probs), probs], axis=-1)
        score = top2[:, 1] - top2[:, 0]
    elif criterion == "entropy":
        c = probs.shape[-1]
        ent = -(probs * np.log(np.clip(probs, 1e-12, 1.0))).sum(axis=-1) / (np.log(c) if c > 1 else 1.0)
        score = -np.clip(ent, 0.0, 1.0)  # rounding must not put a uniform softmax above a threshold of 1
    elif criterion == "patience":
        score = run.astype(np.float32)
    elif criterion == "similarity":
        assert similarity is not None
        score = np.nan_to_num(similarity.astype(np.float32).reshape(-1), nan=-np.inf)
    else:  # gate, q_exit
        assert gate is not None
        g = np.clip(gate.astype(np.float64).reshape(-1), 0.0, 1.0)
        if criterion == "gate":
            score = g
        else:
            score = 1.0 - survive * (1.0 - g)
            survive = survive * (1.0 - g)
    return np.asarray(score, dtype=np.float64), labels, ExitState(labels, run, survive)


def score_threshold(criterion: str, threshold: float) -> float:
    """The score cut that corresponds to a user-facing threshold (exit when score >= cut)."""
    return -float(threshold) if criterion == "entropy" else float(threshold)


def decide(
    criterion: str,
    threshold: float | None,
    logits: np.ndarray | None,
    state: ExitState,
    gate: np.ndarray | None = None,
    similarity: np.ndarray | None = None,
    probs: np.ndarray | None = None,
    stage: int | None = None,
    labels: np.ndarray | None = None,
    max_prob: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, ExitState]:
    """Exit mask (bool [N]) of one early exit, the predicted labels, and the updated state."""
    score, labels, new_state = advance(criterion, logits, state, gate, similarity, probs, stage, labels, max_prob)
    if threshold is None:
        return np.zeros(len(score), dtype=bool), labels, new_state
    return score >= score_threshold(criterion, threshold), labels, new_state
