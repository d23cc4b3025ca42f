"""The scheduler's door to the direct path (`DirectPath`), and requests that arrive together
running together on it (`TurnBatcher`).

Under concurrent load, requests reach the event loop in bursts: in one turn the loop reads several
connections, and each request is decoded and submitted before any of them runs. For a model within
`inline_busy_budget_ms` each would otherwise run its stages alone on the loop's thread, one
`session.run` per stage per request, which is most of what a small model's request costs. The
`TurnBatcher` instead gathers them for the rest of the loop's turn and, at its next
(`loop.call_soon`), runs them as one batch on the direct path: one run per stage for all of them,
survivors going straight on, each request answered with its own rows. No thread hand-off, no wait
beyond the current turn, and a request that arrives with nothing else in progress does not come
here at all: it runs at once. The batch claims the model like one direct request; when the worker
has work meanwhile, the gathered requests join its queues instead (same answers).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from server.engine.direct import DIRECT_MAX_ROWS, FlopCounts, StageCosts, run_direct
from server.engine.rows import Batch, Chunk
from server.engine.runtime import StageRunner
from server.engine.window import LiveWindow
from server.errors import NotReady, OfframpError
from server.interface import InferResult
from server.metrics import Metrics
from server.policy import ExitPolicy
from server.settings import Settings

log = logging.getLogger("offramp.scheduler")


class DirectPath:
    """The direct-path methods of `ModelScheduler` (server.engine.scheduler), over its state."""

    name: str
    runner: StageRunner
    num_classes: int
    settings: Settings
    metrics: Metrics
    window: LiveWindow
    flop_counts: FlopCounts
    _policy: ExitPolicy
    _cond: threading.Condition
    _costs: StageCosts
    _shadow: list[deque[Chunk]]
    _load: int
    _accepting: bool
    _running: Batch | None
    _direct: bool

    def _may_run_direct(self, n: int, busy: bool) -> bool:
        """Cheap pre-check, no lock: small request, no shadow sampling, fast model, not thread-bound."""
        if (n > min(DIRECT_MAX_ROWS, self.settings.max_batch_size) or self.window.enabled or self._load
                or getattr(self.runner, "thread_bound", False)):
            return False
        expected = self._costs.full_depth()
        budget = self.settings.inline_busy_budget_ms if busy else self.settings.inline_budget_ms
        return expected is not None and expected * 1000.0 <= budget

    def _claim_direct(self, n: int) -> bool:
        """Whether the model is idle (nothing waiting, nothing running): then this request has it."""
        with self._cond:
            if not self._accepting:
                raise NotReady(f"model {self.name!r} is not accepting requests")
            if self._load or self._running is not None or self._direct:
                return False
            self._direct = True
            self._load += n
            return True

    def _run_direct(self, x: np.ndarray, n: int, early_exit: bool) -> InferResult:
        try:
            return run_direct(self.runner, self._policy, x, early_exit=early_exit, num_classes=self.num_classes,
                              on_stage=self._direct_stage_done)
        except Exception as err:  # an onnxruntime failure fails this request, as on the worker
            log.exception("%s: direct run of %d rows failed", self.name, n)
            raise OfframpError(f"model {self.name!r}: inference failed: {type(err).__name__}: {err}", 500) from err
        finally:
            with self._cond:
                self._direct = False
                self._load -= n
                if self._load or any(self._shadow):  # the worker waits only if there is work for it
                    self._cond.notify_all()

    def _direct_stage_done(self, stage: int, rows: int, seconds: float, answered: int,
                           tokens: np.ndarray | None) -> None:
        self._costs.observe(stage, rows, seconds, direct=True)
        self.metrics.stage_done(self.name, stage, rows, seconds, answered,
                                *self.flop_counts.of(stage, answered, tokens))


class _Waiting:
    __slots__ = ("x", "early_exit", "future")

    def __init__(self, x: np.ndarray, early_exit: bool, future: asyncio.Future[InferResult]):
        self.x, self.early_exit, self.future = x, early_exit, future


class TurnBatcher:
    """One model's gathered requests. `claim(rows)` takes the model for a direct run (False when it
    is busy), `run(x, rows, early_exit)` is that run (it releases the claim), `enqueue(x,
    early_exit)` the worker's path; batches hold at most `max_rows` rows."""

    def __init__(self, claim: Callable[[int], bool], run: Callable[[np.ndarray, int, bool], InferResult],
                 enqueue: Callable[[np.ndarray, bool], Awaitable[InferResult]], max_rows: int):
        self.claim, self.run, self.enqueue, self.max_rows = claim, run, enqueue, max_rows
        self._waiting: list[_Waiting] = []

    async def submit(self, x: np.ndarray, early_exit: bool) -> InferResult:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[InferResult] = loop.create_future()
        if not self._waiting:
            loop.call_soon(self._flush)
        self._waiting.append(_Waiting(x, early_exit, future))
        return await future  # a caller that goes away cancels it: its rows are left out

    def _flush(self) -> None:
        waiting, self._waiting = [w for w in self._waiting if not w.future.done()], []
        groups: dict[tuple[bool, tuple[int, ...]], list[_Waiting]] = {}
        for w in waiting:  # rows batch with rows of their own shape (a -1 in the input spec) and flag
            groups.setdefault((w.early_exit, w.x.shape[1:]), []).append(w)
        for (early, _), group in groups.items():
            batch: list[_Waiting] = []
            rows = 0
            for w in group:
                if batch and rows + len(w.x) > self.max_rows:
                    self._run(batch, rows, early)
                    batch, rows = [], 0
                batch.append(w)
                rows += len(w.x)
            if batch:
                self._run(batch, rows, early)

    def _run(self, batch: list[_Waiting], rows: int, early_exit: bool) -> None:
        try:
            x = batch[0].x if len(batch) == 1 else np.concatenate([w.x for w in batch])
            if not self.claim(rows):  # the worker has work now: these requests join its queues
                for w in batch:
                    _chain(asyncio.ensure_future(self.enqueue(w.x, early_exit)), w.future)
                return
            result = self.run(x, rows, early_exit)  # releases the claim, whatever happens
        except Exception as err:  # the run's OfframpError, or NotReady while stopping: every request gets it
            for w in batch:
                if not w.future.done():
                    w.future.set_exception(err)
            return
        start = 0
        for w in batch:
            end = start + len(w.x)
            if not w.future.done():
                w.future.set_result(InferResult(result.labels[start:end], result.probabilities[start:end],
                                                result.exit_stage[start:end]))
            start = end


def _chain(task: asyncio.Future[Any], target: asyncio.Future[Any]) -> None:
    """`target` settles as `task` does; cancelling `target` (the caller left) cancels `task`."""
    def settle(done: asyncio.Future[Any]) -> None:
        if target.done():
            return
        if done.cancelled():
            target.cancel()
        elif done.exception() is not None:
            target.set_exception(done.exception())  # type: ignore[arg-type]
        else:
            target.set_result(done.result())

    task.add_done_callback(settle)
    target.add_done_callback(lambda t: task.cancel() if t.cancelled() else None)
