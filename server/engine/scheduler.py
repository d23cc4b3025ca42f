"""Per-model scheduler: dynamic batching, per-sample exits, re-batching of survivors, deeper first.

One worker thread per model runs the stages (onnxruntime releases the GIL); the asyncio side
only enqueues and awaits a future that the worker resolves with `loop.call_soon_threadsafe`.

Samples live in one queue per stage as *chunks* (rows with their hidden state, owners and exit
state). A batch takes chunks from one queue up to `max_batch_size` rows, splitting the last one
if needed. After the stage, the policy snapshot the batch started with decides per row: rows that
exit are written into their request's result (the request resolves when its last row is
answered), the rest are gathered into one chunk for the next stage's queue, where they merge with
the survivors of other batches.

Which queue runs: a queue is *ready* when it holds a full batch, when its oldest row has waited
`max_queue_delay_ms`, when the server is draining, or (stages > 0) when no shallower queue holds
rows that could still join it. The deepest ready queue runs first, so requests in flight finish
before new ones start; waiting a little at deeper stages is what lets survivors of consecutive
batches merge. With `max_queue_delay_ms = 0` this is plain deepest-non-empty-first.

Shadow checks: traced rows (a `shadow_rate` share, server/engine/window.py) that exit early go on
to the last stage in queues that run only when no request work waits; metrics compare labels.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from typing import Any

import numpy as np

from server.engine.direct import FlopCounts, StageCosts, exit_step, row_tokens
from server.engine.inline import DirectPath, TurnBatcher
from server.engine.rows import Batch, Chunk, PendingRequest, by_request, merge, post_result
from server.engine.runtime import StageOutputs, StageRunner
from server.engine.window import LiveWindow
from server.errors import BadRequest, NotReady, OfframpError, Overloaded, RequestTimeout
from server.exits import ExitState
from server.interface import InferResult
from server.metrics import Metrics
from server.policy import ExitPolicy
from server.settings import Settings

log = logging.getLogger("offramp.scheduler")


class ModelScheduler(DirectPath):
    """Queues, worker thread and exit decisions of one model."""

    def __init__(self, name: str, runner: StageRunner, *, flops: list[int], num_classes: int,
                 settings: Settings, metrics: Metrics, policy: ExitPolicy, seed: int | None = None,
                 flop_curves: list[list[float] | None] | None = None):
        if len(flops) != runner.num_stages:
            raise ValueError(f"{name}: {len(flops)} FLOP counts for {runner.num_stages} stages")
        if len(policy.thresholds) != runner.num_stages - 1:
            raise ValueError(f"{name}: policy has {len(policy.thresholds)} thresholds "
                             f"for {runner.num_stages} stages")
        self.name = name
        self.runner = runner
        self.num_stages = runner.num_stages
        self.num_classes = num_classes
        self.flop_counts = FlopCounts(flops, flop_curves)  # FLOPs per answered row, by token count for text
        self.settings = settings
        self.metrics = metrics
        self._policy = policy
        self.window = LiveWindow(self.num_stages, num_classes, settings.window_size, settings.shadow_rate,
                                 np.random.default_rng(seed))
        self._cond = threading.Condition()
        self._queues: list[deque[Chunk]] = [deque() for _ in range(self.num_stages)]
        self._shadow: list[deque[Chunk]] = [deque() for _ in range(self.num_stages)]
        self._reported_depths = [-1] * self.num_stages  # -1: every gauge is reported (at 0) from the start
        self._load = 0  # request rows waiting or in flight (admission bound)
        self._shadow_load = 0
        self._accepting = False
        self._draining = False
        self._halt = False
        self._running: Batch | None = None  # the batch the worker is computing
        self._direct = False  # a request runs on its caller's thread (server.engine.direct)
        self._costs = StageCosts(flops)
        self._turn = TurnBatcher(self._claim_direct, self._run_direct, self._enqueue, settings.max_batch_size)
        self._thread: threading.Thread | None = None

    # ---- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self._accepting = True
        self._thread = threading.Thread(target=self._work, name=f"offramp-{self.name}", daemon=True)
        self._thread.start()
        with self._cond:
            self._report_depths()
        self.set_policy(self._policy)  # report it

    async def stop(self, drain: bool = True) -> None:
        """Stop accepting; with `drain`, finish every request in flight first, else fail them (503)."""
        with self._cond:
            self._accepting = False
            self._draining = True
            if not drain:
                self._halt = True
                self._fail_all(NotReady(f"model {self.name!r} is shutting down"))
            self._cond.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        self.runner.close()

    @property
    def ready(self) -> bool:
        return self._accepting and self._thread is not None and self._thread.is_alive()

    @property
    def policy(self) -> ExitPolicy:
        return self._policy

    def set_policy(self, policy: ExitPolicy) -> None:
        """Swap the live policy (validated by the caller) and report it: the one place that does."""
        self._policy = policy  # one reference swap: a running batch keeps its snapshot
        self.metrics.policy(self.name, policy.version, list(policy.thresholds))

    # ---- request side ----------------------------------------------------------------------------

    async def submit(self, x: Any, *, early_exit: bool = True, direct: bool = True, busy: bool = False) -> InferResult:
        n = len(x)
        if n == 0:
            return InferResult(np.zeros(0, np.int64), np.zeros((0, self.num_classes), np.float32),
                               np.zeros(0, np.int32))
        limit = self.settings.max_queue_size
        if n > limit:
            raise BadRequest(f"request has {n} samples; model {self.name!r} queues at most {limit} "
                             "(max_queue_size): split it")
        if direct and self._may_run_direct(n, busy):
            if busy and isinstance(x, np.ndarray):  # with others that arrive in this turn (server.engine.inline)
                return await self._turn.submit(x, early_exit)
            if self._claim_direct(n):
                return self._run_direct(x, n, early_exit)
        return await self._enqueue(x, early_exit)

    async def _enqueue(self, x: Any, early_exit: bool) -> InferResult:
        n, limit = len(x), self.settings.max_queue_size
        loop = asyncio.get_running_loop()
        req = PendingRequest(n, loop, loop.create_future(), np.zeros(n, np.int64),
                       np.zeros((n, self.num_classes), np.float32), np.zeros(n, np.int32), remaining=n)
        owners = np.empty(n, dtype=object)
        owners.fill(req)
        chunk = Chunk(x, owners, np.arange(n, dtype=np.int64), np.full(n, not early_exit),
                      np.full(n, -1, np.int64), self.window.begin(n), ExitState.initial(n))
        with self._cond:
            if not self._accepting:
                raise NotReady(f"model {self.name!r} is not accepting requests")
            if self._load + n > limit:
                raise Overloaded(f"model {self.name!r} is overloaded: {self._load} samples queued, "
                                 f"limit {limit}; retry later")
            self._load += n
            self._queues[0].append(chunk)
            self._report_depths()
            self._cond.notify_all()
        try:
            return await asyncio.wait_for(req.future, self.settings.request_timeout_s)
        except asyncio.TimeoutError:
            self._abandon(req)
            raise RequestTimeout(f"model {self.name!r} did not answer within "
                                 f"{self.settings.request_timeout_s:g}s") from None
        except asyncio.CancelledError:  # the client went away: drop its work as well
            self._abandon(req)
            raise

    def _abandon(self, req: PendingRequest) -> None:
        with self._cond:
            if req.done:
                return
            req.done = True
            self._load -= req.remaining
            for q in self._queues:  # whole chunks of dead rows go now; mixed chunks are filtered later
                dead = [c for c in q if all(o is not None and o.done for o in c.owners)]
                for c in dead:
                    q.remove(c)
            self._report_depths()
            self._cond.notify_all()

    def _fail(self, owners: np.ndarray, error: OfframpError) -> None:
        """Fail every live request that owns one of these rows (call with the lock held)."""
        for req in {id(o): o for o in owners if o is not None}.values():
            if not req.done:
                req.done = True
                self._load -= req.remaining
                post_result(req.loop, req.future, None, error)

    def _fail_all(self, error: OfframpError) -> None:
        if self._running is not None:
            self._fail(self._running.meta.owners, error)
        for q in self._queues:
            for c in q:
                self._fail(c.owners, error)
            q.clear()
        for q in self._shadow:
            q.clear()
        self._shadow_load = 0

    # ---- worker side -----------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                job = self._next_job()
                self._running = None if job is None or job[2] else job[1]
            if job is None:
                return
            self._execute(*job)
            self._running = None

    def _next_job(self) -> tuple[int, Batch, bool] | None:
        """Wait for the next batch to run (lock held); None when the worker should exit."""
        while True:
            if self._halt:
                return None
            if self._direct:  # a request is running on its caller's thread; wait for it
                self._cond.wait()
                continue
            stage, wait = self._pick(time.monotonic())
            if stage is not None:
                batch = self._form_batch(self._queues[stage])
                if batch is not None:
                    return stage, batch, False
                continue
            if self._draining and wait is None:
                return None  # drained: shadow work is dropped on shutdown
            if wait is None:  # no request work: shadow checks, deepest first
                for k in reversed(range(self.num_stages)):
                    if self._shadow[k]:
                        batch = self._form_batch(self._shadow[k])
                        if batch is not None:
                            return k, batch, True
            self._cond.wait(timeout=wait)

    def _pick(self, now: float) -> tuple[int | None, float | None]:
        """The deepest ready request queue, else how long until one may become ready (None: all empty)."""
        depths = [sum(len(c) for c in q) for q in self._queues]
        delay = self.settings.max_queue_delay_ms / 1000.0
        wait: float | None = None
        for k in reversed(range(self.num_stages)):
            if depths[k] == 0:
                continue
            oldest = min(c.since for c in self._queues[k])
            starved = k > 0 and not any(depths[:k])  # nothing shallower could still join
            full = depths[k] >= self.settings.max_batch_size
            if self._draining or full or starved or now - oldest >= delay:
                return k, None
            left = oldest + delay - now
            wait = left if wait is None else min(wait, left)
        return None, wait

    def _form_batch(self, q: deque[Chunk]) -> Batch | None:
        """Pop up to max_batch_size live rows from a queue, splitting the last chunk if needed (lock held)."""
        room = self.settings.max_batch_size
        parts: list[Chunk] = []
        while q and room > 0:
            chunk = q.popleft()
            alive = chunk.alive()
            if not alive.all():
                chunk = chunk.select(np.flatnonzero(alive))
                if len(chunk) == 0:
                    continue
            if len(chunk) > room:
                q.appendleft(chunk.select(np.arange(room, len(chunk))))
                chunk = chunk.select(np.arange(room))
            parts.append(chunk)
            room -= len(chunk)
        self._report_depths()
        return merge(parts) if parts else None

    def _materialise(self, batch: Batch) -> Any:
        inputs = [p.hidden if p.rows is None else self.runner.take(p.hidden, p.rows) for p in batch.parts]
        return inputs[0] if len(inputs) == 1 else self.runner.concat(inputs)

    def _execute(self, stage: int, batch: Batch, shadow: bool) -> None:
        policy = self._policy  # the snapshot this batch keeps
        try:
            x = self._materialise(batch)
            start = time.perf_counter()
            out = self.runner.run(stage, x)
            seconds = time.perf_counter() - start
            self._costs.observe(stage, len(batch), seconds)
            self.metrics.stage_run(self.name, stage, len(batch), seconds)
            self.window.record(stage, batch.meta.trace, out.logits, out.gate, out.similarity, shadow=shadow)
            if shadow:
                self._after_shadow(stage, batch.meta, out)
            else:
                self._after_stage(stage, batch.meta, out, policy, row_tokens(x))
        except Exception as err:  # an onnxruntime failure fails these requests, not the worker
            log.exception("%s: stage %d failed on a batch of %d", self.name, stage, len(batch))
            with self._cond:
                if shadow:
                    self._shadow_load -= len(batch)
                else:
                    message = f"model {self.name!r}: inference failed at stage {stage}: "
                    message += f"{type(err).__name__}: {err}"
                    self._fail(batch.meta.owners, OfframpError(message, 500))
                self._report_depths()
                self._cond.notify_all()

    def _after_stage(self, stage: int, batch: Chunk, out: StageOutputs, policy: ExitPolicy,
                     tokens: np.ndarray | None) -> None:
        n = len(batch)
        last = stage == self.num_stages - 1
        exit_mask, labels, probs, state = exit_step(policy, stage, last, out, batch.state)
        if not last:
            exit_mask &= ~batch.full
        alive = batch.alive()
        survivors = shadow = None
        go_on = np.flatnonzero(~exit_mask & alive)
        if len(go_on):  # the gather happens when the next stage runs (merged with other survivors)
            rows = None if len(go_on) == n else go_on
            survivors = Chunk(out.hidden, batch.owners[go_on], batch.sample[go_on], batch.full[go_on],
                              batch.early_label[go_on], batch.trace[go_on], state.take(go_on), rows)
        if not last and self.window.enabled:  # traced rows that exit go on to full depth as shadow work
            pick = np.flatnonzero(exit_mask & alive & (batch.trace >= 0))
            pick = pick[:max(0, self.settings.max_queue_size - self._shadow_load)]
            if len(pick):
                shadow = Chunk(out.hidden, np.empty(len(pick), dtype=object), batch.sample[pick],
                               np.ones(len(pick), bool), labels[pick].astype(np.int64), batch.trace[pick],
                               state.take(pick), pick)
        finished: list[PendingRequest] = []
        with self._cond:
            answered, answered_rows = 0, []
            for req, rows in by_request(batch.owners, np.flatnonzero(exit_mask)):
                if req.done:
                    continue
                answered_rows.append(rows)
                j = batch.sample[rows]  # whole-array writes: no per-sample Python on big batches
                req.labels[j], req.probs[j], req.exit_stage[j] = labels[rows], probs[rows], stage
                req.remaining -= len(rows)
                answered += len(rows)
                if req.remaining == 0:
                    req.done = True
                    finished.append(req)
            self._load -= answered
            if survivors is not None:
                self._queues[stage + 1].append(survivors)
            if shadow is not None:
                self._shadow_load += len(shadow)
                self._shadow[stage + 1].append(shadow)
            self._running = None  # done: an answered caller may find the model idle at once
            self._report_depths()
            self._cond.notify_all()
        # Wake the event loop only once the lock is free: its next submit must not wait for us.
        for req in finished:
            post_result(req.loop, req.future, InferResult(req.labels, req.probs, req.exit_stage), None)
        tokens = None if tokens is None or not answered else tokens[np.concatenate(answered_rows)]
        self.metrics.samples_exited(self.name, stage, answered, *self.flop_counts.of(stage, answered, tokens))

    def _after_shadow(self, stage: int, batch: Chunk, out: StageOutputs) -> None:
        if stage == self.num_stages - 1:
            with self._cond:
                self._shadow_load -= len(batch)
            return self.metrics.shadow(self.name, len(batch), int((out.predicted() != batch.early_label).sum()))
        nxt = Chunk(out.hidden, batch.owners, batch.sample, batch.full, batch.early_label, batch.trace, batch.state)
        with self._cond:
            self._shadow[stage + 1].append(nxt)
            self._cond.notify_all()

    def _report_depths(self) -> None:
        """Queue-depth gauges, only where a depth changed (called under the lock, several times per batch)."""
        for k, q in enumerate(self._queues):
            depth = sum(len(c) for c in q)
            if self._reported_depths[k] != depth:
                self._reported_depths[k] = depth
                self.metrics.queue(self.name, k, depth)
