"""The early-exit serving engine: bundles in, per-sample answers out. Knows nothing of HTTP.

`Engine` owns one `ModelScheduler` (queues + worker thread) and one stage runner per bundle. The
live `ExitPolicy` of a model has one owner: the engine until the model starts, its scheduler from
then on (the engine hands it over in `start()` and takes it back in `stop()`). The constructor only
checks its arguments; sessions are created by `start()` (the FastAPI lifespan), so building an
app never loads a model. `Engine` implements `server.interface.ServingEngine`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from server.bundle import NUMPY_DTYPES, Bundle
from server.engine.graphs import stage_runner
from server.engine.runtime import StageRunner
from server.engine.scheduler import ModelScheduler
from server.errors import BadRequest, NotFound, NotReady
from server.interface import InferResult, WindowView
from server.metrics import Metrics
from server.policy import ExitPolicy
from server.settings import Settings
from server.text import TokenRows, check_mask, tokenizer_for, trim

__all__ = ["Engine", "InferResult", "RunnerFactory"]

log = logging.getLogger("offramp.engine")

RunnerFactory = Callable[[Bundle, Settings], StageRunner]


class Engine:
    """Serve several bundles, each as a model named by its manifest."""

    def __init__(self, bundles: list[Bundle], settings: Settings, metrics: Metrics,
                 initial_policies: dict[str, ExitPolicy] | None = None, *,
                 runner_factory: RunnerFactory | None = None):
        if not bundles:
            raise ValueError("the engine needs at least one bundle")
        names = [b.name for b in bundles]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"several bundles are named {duplicates}: model names must be unique")
        self._bundles = {b.name: b for b in bundles}
        initial_policies = dict(initial_policies or {})
        unknown = sorted(set(initial_policies) - set(self._bundles))
        if unknown:
            raise ValueError(f"initial policies for unknown models {unknown}; models are {names}")
        self._policies: dict[str, ExitPolicy] = {}
        problems: list[str] = []
        for name, bundle in self._bundles.items():
            given = initial_policies.get(name)
            policy = given if given is not None else bundle.manifest.default_policy.with_version(1)
            what = "" if given is not None else "default policy: "
            problems.extend(f"{name}: {what}{p}" for p in policy.problems_for(bundle.manifest))
            self._policies[name] = policy
        if problems:
            raise ValueError("; ".join(problems))
        self.settings = settings
        self.metrics = metrics
        self._runner_factory: RunnerFactory = runner_factory or stage_runner
        self._schedulers: dict[str, ModelScheduler] = {}
        self._started = False

    async def start(self) -> None:
        """Create the stage sessions (off the event loop: it takes a while) and start the workers."""
        if self._started:
            return
        try:
            for name, bundle in self._bundles.items():
                if bundle.manifest.text is not None:
                    tokenizer_for(bundle)  # a damaged tokenizer.json stops the start, with its path
                runner = await asyncio.to_thread(self._runner_factory, bundle, self.settings)
                m = bundle.manifest
                scheduler = ModelScheduler(
                    name, runner, flops=[s.flops for s in m.stages], num_classes=m.num_classes,
                    settings=self.settings, metrics=self.metrics, policy=self._policies[name],
                    flop_curves=[s.flops_curve for s in m.stages],
                )  # from here on the scheduler owns the live policy
                if self.settings.persist_window and scheduler.window.enabled:
                    read = scheduler.window.load(self._window_file(name))
                    log.info("%s: %d live-window records read back", name, read)
                scheduler.start()
                self._schedulers[name] = scheduler
                log.info("%s: serving %d stages, policy %s", name, m.num_stages,
                         self._policies[name].describe())
        except BaseException:
            await self.stop(drain=False)
            raise
        self._started = True

    async def stop(self, drain: bool = True) -> None:
        """Stop accepting; with `drain`, finish the requests in flight first. Idempotent."""
        self._started = False
        schedulers, self._schedulers = self._schedulers, {}
        for name, scheduler in schedulers.items():
            self._policies[name] = scheduler.policy  # the engine owns it again
        await asyncio.gather(*(s.stop(drain=drain) for s in schedulers.values()))
        for name, scheduler in schedulers.items():
            if self.settings.persist_window and len(scheduler.window):
                scheduler.window.save(self._window_file(name))

    def _window_file(self, model: str) -> Path:
        return self.settings.resolved_state_dir / f"{model}.window.npz"

    @property
    def ready(self) -> bool:
        return self._started and all(s.ready for s in self._schedulers.values())

    def model_names(self) -> list[str]:
        return list(self._bundles)

    def bundle(self, model: str) -> Bundle:
        try:
            return self._bundles[model]
        except KeyError:
            raise NotFound(f"unknown model {model!r}; models are {self.model_names()}") from None

    def policy(self, model: str) -> ExitPolicy:
        self.bundle(model)
        scheduler = self._schedulers.get(model)
        return scheduler.policy if scheduler is not None else self._policies[model]

    def set_policy(self, model: str, policy: ExitPolicy) -> None:
        """Swap the model's policy atomically; batches that start from now on use it.

        Raises `ValueError` when the policy does not fit the model (threshold count, a criterion
        reading an output the stages do not have).
        """
        bundle = self.bundle(model)
        problems = policy.problems_for(bundle.manifest)
        if problems:
            raise ValueError(f"{model}: " + "; ".join(problems))
        scheduler = self._schedulers.get(model)
        if scheduler is not None:
            scheduler.set_policy(policy)
        else:
            self._policies[model] = policy  # the scheduler reports it from start on
            self.metrics.policy(model, policy.version, list(policy.thresholds))
        log.info("%s: exit policy now %s", model, policy.describe())

    def window(self, model: str) -> WindowView:
        self.bundle(model)
        scheduler = self._schedulers.get(model)
        if scheduler is None:
            return WindowView(None, 0, 0, [0] * self._bundles[model].manifest.num_stages)
        w = scheduler.window
        return WindowView(w.calibration(), len(w), w.total, w.shadow_stage_rows.tolist(),
                          w.capacity if w.enabled else 0)

    def device(self, model: str) -> str:
        """Where the model's stages run: "cuda" or "cpu"; "stopped" before start and after stop."""
        scheduler = self._schedulers.get(model)
        runner = None if scheduler is None else scheduler.runner
        return getattr(runner, "device", "cpu") if runner is not None else "stopped"

    async def infer(self, model: str, x: np.ndarray | TokenRows, *, early_exit: bool = True,
                    direct: bool = True, busy: bool = False) -> InferResult:
        """Answer every sample of `x` (its first axis), each at the stage where it may exit. Text
        models take `TokenRows` (token ids and attention mask, server/text.py).

        Raises BadRequest (shape), NotFound (model), NotReady (not started / stopping),
        Overloaded (queue full), RequestTimeout (request_timeout_s), OfframpError 500 (runtime).
        """
        bundle = self.bundle(model)
        text = bundle.manifest.text
        if text is not None or isinstance(x, TokenRows):
            if text is None or not isinstance(x, TokenRows):
                raise BadRequest(f"model {model!r} takes " + ("token rows" if text is not None else "arrays"))
            check_mask(x.data, x.mask, text.max_length)
            scheduler = self._schedulers.get(model)
            if scheduler is None:
                raise NotReady(f"model {model!r} is not serving (not started yet, or shutting down)")
            # Padding no row needs (a client's own ids may carry some) is dropped before any stage runs.
            rows = trim(TokenRows(np.ascontiguousarray(x.data, np.int64), np.ascontiguousarray(x.mask, np.int64)))
            return await scheduler.submit(rows, early_exit=early_exit, direct=direct, busy=busy)
        spec = bundle.manifest.input
        want = tuple(spec.shape[1:])
        if x.shape[1:] != want and (  # the fast test first: most inputs have fixed sample shapes
                x.ndim != len(spec.shape) or any(w not in (-1, h) for w, h in zip(want, x.shape[1:], strict=True))):
            raise BadRequest(f"input {spec.name!r} of model {model!r} must have shape {spec.shape}, "
                             f"got {list(x.shape)}")
        scheduler = self._schedulers.get(model)
        if scheduler is None:
            raise NotReady(f"model {model!r} is not serving (not started yet, or shutting down)")
        dtype = NUMPY_DTYPES[spec.dtype]
        x = np.ascontiguousarray(x, dtype=dtype)
        return await scheduler.submit(x, early_exit=early_exit, direct=direct, busy=busy)
