"""Auto-recalibration: live agreement from the calibration window, and thresholds that follow it.

Per model, opt in with `PUT /admin/models/{m}/auto-calibration` (server/http/admin.py). Every
`auto_interval_s` the controller reads the model's live window (server/engine/window.py: traced
samples' exit outputs at every stage and their full-depth labels) and replays the live policy on
it (`calibrate.simulate`): its agreement with full depth, per exit and overall, and the overall
agreement's one-sided lower confidence bound (Clopper-Pearson at `confidence`). Then:

- **tighten** when that lower bound is below `target_agreement`: new thresholds certified on the
  window (`guarantee.guaranteed`, the same Learn-then-Test method as every calibration; with too
  little evidence for an exit it stays off, with too little for any, every exit is off: the
  fail-safe direction);
- **relax** when the lower bound is above the target by `hysteresis` and thresholds certified on
  the window cost at least `min_saving` less compute there;
- otherwise nothing. After a change the controller waits for `min_samples` new window samples
  before the next, so it does not flap on the evidence it just acted on.

Each change is a normal versioned policy change (source `auto (tighten: ...)` / `auto (relax: ...)`,
with the figures, in the history), written through the store with the live version as the expected
one: across replicas exactly one writer applies a change (the others' compare-and-set fails and
they pick the new version up through sync), and an operator's change in between wins. An operator's
PUT or calibrate keeps auto-calibration as it is (on stays on, acting on later evidence); turn it
off with `{"enabled": false}`. The configuration lives in the replica's memory.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

from server.control.calibrate import simulate, stage_flops
from server.control.guarantee import clopper_pearson, guaranteed
from server.control.policies import PolicyControl
from server.errors import Conflict, OfframpError
from server.interface import ServingEngine
from server.metrics import Metrics
from server.policy import ExitPolicy

log = logging.getLogger("offramp.auto")
SOURCE_AUTO = "auto"


@dataclass(frozen=True)
class AutoConfig:
    enabled: bool = False
    target_agreement: float = 0.99
    confidence: float = 0.95
    min_samples: int = 200
    hysteresis: float = 0.005
    min_saving: float = 0.02


@dataclass
class AutoState:
    config: AutoConfig = field(default_factory=AutoConfig)
    live: dict[str, Any] = field(default_factory=dict)
    last_action: dict[str, Any] | None = None
    samples_at_change: int = -1  # the window's total when the controller last changed the policy
    samples_judged: int = -1  # the window's total when the controller last certified thresholds on it

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self.config), "live": self.live, "last_action": self.last_action}


def lower_bound(agree: int, n: int, confidence: float) -> float:
    """One-sided lower confidence bound of an agreement rate (a two-sided interval at 2c - 1)."""
    return 0.0 if n == 0 else clopper_pearson(agree, n, 2 * confidence - 1)[0]


class AutoCalibrator:
    """The controller of every model's auto-recalibration on this replica."""

    def __init__(self, engine: ServingEngine, control: PolicyControl, metrics: Metrics, interval_s: float = 2.0):
        self.engine, self.control, self.metrics, self.interval_s = engine, control, metrics, interval_s
        self._states: dict[str, AutoState] = {}
        self._lock = threading.Lock()
        self._task: asyncio.Task[None] | None = None

    def state(self, model: str) -> AutoState:
        self.engine.bundle(model)  # NotFound for unknown models
        with self._lock:
            return self._states.setdefault(model, AutoState())

    def configure(self, model: str, config: AutoConfig) -> dict[str, Any]:
        """Set the model's controller; Conflict (409) when it is enabled but could never act."""
        st = self.state(model)
        capacity = self.engine.window(model).capacity
        if config.enabled and capacity == 0:
            raise Conflict(f"{model}: auto-calibration needs the live window: start the server with "
                           "shadow_rate > 0 and window_size > 0")
        if config.enabled and 0 < capacity < config.min_samples:
            raise Conflict(f"{model}: min_samples {config.min_samples} exceeds the window's {capacity} samples "
                           "(window_size): it would never act")
        with self._lock:
            st.config, st.samples_at_change, st.samples_judged = config, -1, -1
        log.info("%s: auto-calibration %s", model, asdict(config))
        return self.step(model) if config.enabled else self.describe(model)

    def describe(self, model: str) -> dict[str, Any]:
        """The configuration with fresh live figures (GET)."""
        self.estimate(model)
        return self._answer(model)

    def _answer(self, model: str) -> dict[str, Any]:
        return {"model": model, **self.state(model).to_dict()}

    def estimate(self, model: str) -> tuple[Any, ExitPolicy, Any]:
        """Live figures of the current policy on the window (also published as metrics)."""
        st, view = self.state(model), self.engine.window(model)
        policy = self.engine.policy(model)
        manifest = self.engine.bundle(model).manifest
        live: dict[str, Any] = {"window_samples": view.samples, "traced_total": view.total,
                                "shadow_flops": float(sum(r * f for r, f in zip(view.shadow_stage_rows,
                                                                               stage_flops(manifest), strict=True)))}
        report = None
        if view.calibration is not None:
            report = simulate(view.calibration, policy.criterion, policy.thresholds, manifest)
            n = report.samples
            agree = int(round(report.agreement * n))
            live.update(agreement=report.agreement, agreement_lower=lower_bound(agree, n, st.config.confidence),
                        exit_agreement=report.exit_agreement, compute_fraction=report.compute_fraction,
                        policy_version=policy.version)
        st.live = live
        self.metrics.live_window(model, live)
        return view, policy, report

    def step(self, model: str) -> dict[str, Any]:
        """One look at the window; changes the policy when the evidence says so."""
        st = self.state(model)
        cfg = st.config
        view, policy, report = self.estimate(model)
        if not cfg.enabled or report is None or view.samples < cfg.min_samples or view.total == st.samples_judged:
            return self._answer(model)  # nothing new in the window since the last look: nothing to certify
        if st.samples_at_change >= 0 and view.total - st.samples_at_change < cfg.min_samples:
            return self._answer(model)  # waiting for evidence the last change has not seen
        lower, target = st.live["agreement_lower"], cfg.target_agreement
        action = "tighten" if lower < target else "relax" if lower > target + cfg.hysteresis else None
        if action is None:
            return self._answer(model)
        st.samples_judged = view.total
        manifest = self.engine.bundle(model).manifest
        certified = guaranteed(view.calibration, manifest, target_agreement=target, confidence=cfg.confidence,
                               criterion=policy.criterion)
        new = ExitPolicy(policy.criterion, tuple(certified.thresholds))
        cost = simulate(view.calibration, new.criterion, new.thresholds, manifest).compute_fraction
        if new.same_as(policy) or (action == "relax" and cost > report.compute_fraction - cfg.min_saving):
            return self._answer(model)
        reason = (f"{SOURCE_AUTO} ({action}: live agreement {report.agreement:.4f}, lower bound {lower:.4f} "
                  f"vs target {target:g} on {view.samples} window samples; compute "
                  f"{report.compute_fraction:.3f} -> {cost:.3f})")
        try:
            record = self.control.apply(model, new, reason, expected=policy.version)
        except OfframpError as err:  # another replica or an operator changed it first
            log.info("%s: auto-calibration skipped: %s", model, err)
            return self._answer(model)
        st.samples_at_change = view.total
        st.last_action = {"action": action, "version": record.version, "reason": reason}
        self.metrics.auto_change(model, action)
        log.info("%s: %s", model, reason)
        self.estimate(model)  # the live figures of the new policy, for the answer and the metrics
        return self._answer(model)

    async def run(self) -> None:
        """The periodic loop (the app's lifespan starts and cancels it)."""
        while True:
            await asyncio.sleep(self.interval_s)
            for model in self.engine.model_names():
                with self._lock:
                    st = self._states.get(model)
                if st is None:
                    continue
                try:
                    await asyncio.to_thread(self.step, model)
                except Exception:  # a bad step must not stop the loop: the next one retries
                    log.exception("%s: auto-calibration step failed", model)
