"""The direct path: a small request on an idle model runs stage after stage on the caller's thread.

Handing a request to the worker thread and its answer back costs two thread wake-ups (a condition
variable, then the event loop's self-pipe): ~100 us on a 2-core machine, several times what a
stage of a small model costs at batch 1. When nothing else is queued or running there is nothing
to batch with, so the scheduler runs such a request here instead: the same stages, the same exit
decisions (`exits.decide` with the policy snapshot taken once), survivors going straight into the
next stage, later stages never run for rows that left. Only requests whose full depth is expected
to cost at most `inline_budget_ms` take it, so the event loop is never held for long; the
estimate comes from measured stage times (`StageCosts`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from server.engine.runtime import StageOutputs, StageRunner
from server.exits import ExitState, decide
from server.interface import InferResult
from server.policy import ExitPolicy

DIRECT_MAX_ROWS = 4  # larger requests go to the worker: they are worth batching with others
EWMA = 0.2

# (stage, rows run, seconds, rows answered there)
StageHook = Callable[[int, int, float, int], None]


class StageCosts:
    """Seconds one stage run of up to DIRECT_MAX_ROWS rows takes, as a moving average per stage;
    stages not measured yet (early exits keep deep stages idle) are estimated from their FLOPs."""

    def __init__(self, flops: list[int]):
        self.flops = np.asarray(flops, dtype=np.float64)
        self.seconds: list[float | None] = [None] * len(flops)

    def observe(self, stage: int, rows: int, seconds: float) -> None:
        if rows <= DIRECT_MAX_ROWS:
            old = self.seconds[stage]
            self.seconds[stage] = seconds if old is None else (1 - EWMA) * old + EWMA * seconds

    def full_depth(self) -> float | None:
        """Expected seconds of a small request at full depth; None before any stage was measured."""
        known = [(s, f) for s, f in zip(self.seconds, self.flops, strict=True) if s is not None]
        if not known:
            return None
        per_flop = max(s / max(f, 1.0) for s, f in known)
        return float(sum(s if s is not None else per_flop * f
                         for s, f in zip(self.seconds, self.flops, strict=True)))


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


def run_direct(runner: StageRunner, policy: ExitPolicy, x: Any, *, early_exit: bool, num_classes: int,
               on_stage: StageHook) -> InferResult:
    """Every row of `x` answered at its exit, running the stages here (see the module docstring)."""
    n = int(x.shape[0])
    labels_out = np.empty(n, np.int64)
    probs_out = np.empty((n, num_classes), np.float32)
    stage_out = np.empty(n, np.int32)
    rows = np.arange(n)  # which request row each row of `hidden` is
    hidden, state = x, ExitState.initial(n)
    last = runner.num_stages - 1
    for stage in range(runner.num_stages):
        started = time.perf_counter()
        out = runner.run(stage, hidden)
        seconds = time.perf_counter() - started
        leave, labels, probs, state = exit_step(policy, stage, stage == last, out, state)
        if not early_exit and stage != last:
            leave = np.zeros(len(rows), bool)
        exited = np.flatnonzero(leave)
        if len(exited):
            where = rows[exited]
            labels_out[where], probs_out[where], stage_out[where] = labels[exited], probs[exited], stage
        on_stage(stage, len(rows), seconds, len(exited))
        if len(exited) == len(rows):
            break
        if len(exited):
            stay = np.flatnonzero(~leave)
            rows, state = rows[stay], state.take(stay)
            hidden = runner.take(out.hidden, stay)
        else:
            hidden = out.hidden
    return InferResult(labels_out, probs_out, stage_out)
