"""The direct path: a small request on an idle model runs stage after stage on the caller's thread.

Handing a request to the worker thread and its answer back costs two thread wake-ups (a condition
variable, then the event loop's self-pipe): ~100 us on a 2-core machine, several times what a
stage of a small model costs at batch 1. When nothing else is queued or running there is nothing
to batch with, so the scheduler runs such a request here instead: the same stages, the same exit
decisions (`exits.decide` with the policy snapshot taken once), survivors going straight into the
next stage, later stages never run for rows that left. Only requests whose full depth is expected
to cost at most `inline_budget_ms` take it (`inline_busy_budget_ms` when the caller has other
requests in progress: those run batched with their turn, server.engine.inline), so the event loop
is never held for long; the estimate comes from measured stage times (`StageCosts`). The
scheduler's side of it (admission, the claim on the model) is `server.engine.inline.DirectPath`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from server.engine.runtime import StageOutputs, StageRunner
from server.exits import CRITERIA, ExitState, decide, score_threshold
from server.interface import InferResult
from server.policy import ExitPolicy
from server.text import TokenRows

DIRECT_MAX_ROWS = 4  # larger requests go to the worker: they are worth batching with others
WINDOW = 9  # stage runs remembered per stage
REESTIMATE_EVERY = 16

# (stage, rows run, seconds, rows answered there, their token counts for text models)
StageHook = Callable[[int, int, float, int, "np.ndarray | None"], None]


class FlopCounts:
    """FLOPs answered rows cost up to their exit, and would have cost at full depth: FLOPs per sample
    per stage, or for text models each stage's curve in the row's token count (`StageSpec.flops_curve`)."""

    def __init__(self, flops: list[int], curves: list[list[float] | None] | None = None):
        self.cum = np.cumsum(np.asarray(flops, dtype=np.float64))
        self.curves = None
        if curves is not None and all(c is not None for c in curves):
            self.curves = np.cumsum(np.asarray(curves, dtype=np.float64), axis=0)  # [S, 3], cumulative

    def of(self, stage: int, count: int, tokens: np.ndarray | None = None) -> tuple[float, float]:
        """(executed, full depth) FLOPs of `count` rows answered at `stage`."""
        if self.curves is None or tokens is None:
            return count * float(self.cum[stage]), count * float(self.cum[-1])
        t = tokens.astype(np.float64)
        powers = np.stack([np.ones_like(t), t, t * t])  # [3, n]
        per_row = self.curves @ powers  # [S, n]
        return float(per_row[stage].sum()), float(per_row[-1].sum())


def row_tokens(x: Any) -> np.ndarray | None:
    """Real tokens per row of a stage input (text models), else None."""
    return x.lengths() if isinstance(x, TokenRows) else None


class StageCosts:
    """Seconds one stage run of up to DIRECT_MAX_ROWS rows takes: the median of its last few runs
    (robust to a run the OS descheduled). Once a stage has run on the direct path, only its direct
    runs count: a run on the worker also waits to take the GIL back from the event loop after
    onnxruntime released it (up to the interpreter's switch interval), and under load those waits
    made a fast model look slow and kept it off the direct path, where a request costs least.
    Stages not measured (early exits keep deep stages idle) are estimated from their FLOPs at the
    slowest measured rate. The full-depth figure is recomputed every few observations, not on
    every request."""

    def __init__(self, flops: list[int]):
        self.flops = np.asarray(flops, dtype=np.float64)
        self.recent: list[deque[float]] = [deque(maxlen=WINDOW) for _ in flops]
        self.direct = [False] * len(flops)  # whether the stage's window holds direct runs
        self._estimate: float | None = None
        self._fresh = 0  # observations since the estimate was computed

    def observe(self, stage: int, rows: int, seconds: float, direct: bool = False) -> None:
        if rows > DIRECT_MAX_ROWS or (self.direct[stage] and not direct):
            return
        if direct and not self.direct[stage]:
            self.recent[stage].clear()  # the worker's runs give way to the first direct one
            self.direct[stage] = True
            self._estimate = None  # re-estimated at once, below
        self.recent[stage].append(seconds)
        self._fresh += 1
        if self._estimate is None or self._fresh >= REESTIMATE_EVERY:
            self._estimate, self._fresh = self._full_depth(), 0

    def full_depth(self) -> float | None:
        """Expected seconds of a small request at full depth; None before any stage was measured."""
        return self._estimate

    def _full_depth(self) -> float | None:
        medians = [sorted(r)[len(r) // 2] if r else None for r in self.recent]
        known = [(m, f) for m, f in zip(medians, self.flops, strict=True) if m is not None]
        if not known:
            return None
        per_flop = max(m / max(f, 1.0) for m, f in known)
        return float(sum(m if m is not None else per_flop * f for m, f in zip(medians, self.flops, strict=True)))


def exit_step(policy: ExitPolicy, stage: int, last: bool, out: StageOutputs,
              state: ExitState) -> tuple[np.ndarray, np.ndarray, np.ndarray, ExitState]:
    """One stage's exit decision for its rows: (leave mask, labels, probabilities, next state). The
    worker and the direct path both decide through here, so both answer alike."""
    probs = out.probabilities()
    if last:
        return np.ones(len(probs), bool), out.predicted(), probs, state
    leave, labels, state = decide(policy.criterion, policy.threshold(stage), out.logits, state, out.gate,
                                  out.similarity, probs, stage, out.labels, out.max_prob)
    return leave, labels, probs, state


def _direct_step(policy: ExitPolicy, stage: int, last: bool, out: StageOutputs,
                 state: ExitState | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, ExitState | None]:
    """`exit_step` for the direct path, whose policy cannot change mid-request: a criterion that needs
    no exit state and whose score the graph computed is one comparison of that score (the same cut
    `exits.decide` applies), and the exit state is made only when a criterion needs it."""
    score = None if last or CRITERIA[policy.criterion].stateful else out.in_graph_score(policy.criterion)
    if score is not None and out.labels is not None:
        threshold = policy.threshold(stage)
        leave = (np.zeros(len(score), bool) if threshold is None
                 else score.astype(np.float64) >= score_threshold(policy.criterion, threshold))
        return leave, out.labels, out.probabilities(), state
    return exit_step(policy, stage, last, out, state if state is not None else ExitState.initial(len(out)))


def run_direct(runner: StageRunner, policy: ExitPolicy, x: Any, *, early_exit: bool, num_classes: int,
               on_stage: StageHook) -> InferResult:
    """Every row of `x` answered at its exit, running the stages here (see the module docstring)."""
    n = len(x)
    rows = np.arange(n)  # which request row each row of `hidden` is
    labels_out = probs_out = stage_out = None  # made at the first partial exit
    hidden: Any = x
    state: ExitState | None = None  # made when a criterion needs it (exit_step)
    last = runner.num_stages - 1
    for stage in range(runner.num_stages):
        started = time.perf_counter()
        out = runner.run(stage, hidden)
        seconds = time.perf_counter() - started
        if not early_exit and stage != last:  # full depth: no exit to decide before the last stage
            on_stage(stage, len(rows), seconds, 0, None)
            hidden = out.hidden
            continue
        leave, labels, probs, state = _direct_step(policy, stage, stage == last, out, state)
        tokens = row_tokens(hidden)
        if leave.all():  # the common case at batch 1: everyone left here
            on_stage(stage, len(rows), seconds, len(rows), tokens)
            if labels_out is None or probs_out is None or stage_out is None:  # nobody left earlier
                return InferResult(labels.astype(np.int64, copy=False), probs, np.full(n, stage, np.int32))
            labels_out[rows], probs_out[rows], stage_out[rows] = labels, probs, stage
            break
        exited = np.flatnonzero(leave)
        if len(exited):
            if labels_out is None or probs_out is None or stage_out is None:
                labels_out = np.empty(n, np.int64)
                probs_out = np.empty((n, num_classes), np.float32)
                stage_out = np.empty(n, np.int32)
            where = rows[exited]
            labels_out[where], probs_out[where], stage_out[where] = labels[exited], probs[exited], stage
        on_stage(stage, len(rows), seconds, len(exited), None if tokens is None else tokens[exited])
        if len(exited):
            stay = np.flatnonzero(~leave)
            rows, state = rows[stay], None if state is None else state.take(stay)
            hidden = runner.take(out.hidden, stay)
        else:
            hidden = out.hidden
    assert labels_out is not None and probs_out is not None and stage_out is not None  # the last stage answers all
    return InferResult(labels_out, probs_out, stage_out)
