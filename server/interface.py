"""The engine's interface, as the HTTP routes, the admin API and replica sync see it.

`server.engine.engine.Engine` implements it; the tests' fakes (tests/fakes.py) do too. It lives down here,
beside the base modules, so that `http/` and `control/` depend on the interface, not on the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from server.bundle import Bundle, Calibration
from server.policy import ExitPolicy
from server.text import TokenRows


@dataclass(frozen=True)
class InferResult:
    """The answer to one request, one row per sample."""

    labels: np.ndarray  # int64 [N]
    probabilities: np.ndarray  # float32 [N, C]
    exit_stage: np.ndarray  # int32 [N], 0-based stage index
    prediction_set: np.ndarray | None = None  # bool [N, C] when asked for (server/conformal.py)


@dataclass(frozen=True)
class WindowView:
    """A model's live calibration window (server/engine/window.py) as control/ sees it."""

    calibration: Calibration | None  # labels: the full-depth labels; None while empty
    samples: int
    total: int  # traced samples completed since start
    shadow_stage_rows: list[int]  # per stage, rows run only because they were traced
    capacity: int = -1  # samples the window can hold; 0: no window (shadow_rate or window_size 0); -1: unknown


class ServingEngine(Protocol):
    """Serve several bundles, each as a model named by its manifest, each with a live policy."""

    @property
    def ready(self) -> bool: ...

    def model_names(self) -> list[str]: ...

    def bundle(self, model: str) -> Bundle:
        """The model's bundle; `NotFound` (404) naming the served models for any other name."""
        ...

    def policy(self, model: str) -> ExitPolicy: ...

    def set_policy(self, model: str, policy: ExitPolicy) -> None:
        """Swap the live policy; the caller has validated it (`ExitPolicy.checked`)."""
        ...

    def window(self, model: str) -> WindowView:
        """The model's live calibration window (empty while `shadow_rate` is 0 or before start)."""
        ...

    async def start(self) -> None: ...

    async def stop(self, drain: bool = True) -> None: ...

    async def infer(self, model: str, x: np.ndarray | TokenRows, *, early_exit: bool = True,
                    direct: bool = True, busy: bool = False) -> InferResult:
        """Every sample of `x` (token rows for text models) answered at its exit. `direct=False`:
        never on the caller's thread (the caller has other work the worker thread could overlap with);
        `busy`: the caller has other requests in progress, so only a model within
        `inline_busy_budget_ms` runs on its thread."""
        ...
