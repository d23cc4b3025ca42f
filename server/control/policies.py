"""Live exit control: read, change and recalibrate a model's policy, store first, then engine.

The admin routes (server.http.admin) decode a request and call this; nothing here knows HTTP. A
change is validated once (`ExitPolicy.problems_for`), persisted by the store's compare-and-set (so
`If-Match` is checked against the durable version), then swapped into the engine; batches already
running finish with the policy they started with. Methods block (store I/O, calibration): call
them off the event loop.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from server.bundle import Calibration
from server.control.calibrate import TARGETS, available_criteria, calibrate, simulate
from server.control.guarantee import CONFIDENCE, guaranteed
from server.control.store import SOURCE_CALIBRATE, SOURCE_PUT, PolicyStore, stored_or_seeded
from server.errors import BundleError, Unprocessable
from server.interface import ServingEngine
from server.policy import ExitPolicy


class PolicyControl:
    """The admin operations on the live policies of an engine's models."""

    def __init__(self, engine: ServingEngine, store: PolicyStore):
        self.engine, self.store = engine, store
        self._apply_lock = threading.Lock()  # store.update and engine.set_policy happen in version order

    def current(self, model: str) -> ExitPolicy:
        """The stored policy of `model` (`NotFound` for an unknown model); an empty store is seeded
        with the running policy (`stored_or_seeded`)."""
        return stored_or_seeded(self.store, model, self.engine.policy(model))

    def describe(self, model: str, record: ExitPolicy) -> dict[str, Any]:
        """A policy as the admin API shows it, with the criteria the model can serve and its default."""
        manifest = self.engine.bundle(model).manifest
        default = manifest.default_policy
        return {
            "model": model,
            **record.to_dict(),
            "criteria": available_criteria(manifest),
            "default": {"criterion": default.criterion, "thresholds": list(default.thresholds)},
        }

    def history(self, model: str) -> list[ExitPolicy]:
        self.engine.bundle(model)
        return self.store.history(model)

    def put(self, model: str, criterion: str | None, thresholds: Sequence[float | None],
            expected: int | None) -> ExitPolicy:
        """Set the thresholds (and the criterion; None keeps the current one)."""
        chosen = criterion if criterion is not None else self.current(model).criterion
        return self.apply(model, ExitPolicy(chosen, tuple(thresholds)), SOURCE_PUT, expected)

    def calibrate(self, model: str, targets: dict[str, float], criterion: str | None, dry_run: bool,
                  expected: int | None, confidence: float | None = CONFIDENCE) -> dict[str, Any]:
        """Thresholds for exactly one target from the bundle's calibration data; applied unless `dry_run`.
        Agreement and accuracy targets are met with probability >= `confidence` (server/control/guarantee.py);
        `confidence` None (and compute budgets) picks the cheapest thresholds meeting it in-sample."""
        if len(targets) != 1:
            raise Unprocessable(f"give exactly one of {', '.join(TARGETS)}; got {sorted(targets) or 'none'}")
        manifest = self.engine.bundle(model).manifest
        live = self.current(model)
        calib = self._calibration(model)
        usable = available_criteria(manifest, calib)
        chosen = criterion or (live.criterion if live.criterion in usable else "max_prob")
        if chosen not in usable:
            raise Unprocessable(f"criterion {chosen!r} cannot be calibrated for {model}; available: {usable}")
        (name, value), = targets.items()
        try:
            if confidence is not None and name != "compute_budget":
                certified = guaranteed(calib, manifest, criterion=chosen, confidence=confidence,
                                       **{name: float(value)})  # type: ignore[arg-type]
                thresholds = certified.thresholds
                extra = {"guarantee": certified.to_dict(),  # and the thresholds on every calibration sample:
                         "expected": simulate(calib, chosen, thresholds, manifest).to_dict()}
            else:
                result = calibrate(calib, manifest, criterion=chosen, **{name: float(value)})  # type: ignore[arg-type]
                thresholds, extra = result.thresholds, result.to_dict()
        except ValueError as err:
            raise Unprocessable(str(err)) from err
        out: dict[str, Any] = {"model": model, "dry_run": dry_run, "criterion": chosen, "target": {name: value},
                               "thresholds": thresholds, **extra}
        if dry_run:
            out.update(applied=False, version=None, current_version=live.version)
            return out
        record = self._apply(model, ExitPolicy(chosen, tuple(thresholds)),
                             f"{SOURCE_CALIBRATE} ({name}={value:g})", expected)
        out.update(applied=True, version=record.version, current_version=record.version)
        return out

    def apply(self, model: str, policy: ExitPolicy, source: str, expected: int | None) -> ExitPolicy:
        """Validate, store, then serve a change (the PUT route, auto-recalibration)."""
        problems = policy.problems_for(self.engine.bundle(model).manifest)
        if problems:
            raise Unprocessable(f"invalid exit policy for {model}: " + "; ".join(problems))
        return self._apply(model, policy, source, expected)

    def _apply(self, model: str, policy: ExitPolicy, source: str, expected: int | None) -> ExitPolicy:
        with self._apply_lock:
            record = self.store.update(model, policy, source, expected)
            self.engine.set_policy(model, record)
        return record

    def _calibration(self, model: str) -> Calibration:
        try:
            return self.engine.bundle(model).calibration()  # read once by the bundle
        except BundleError as err:
            raise Unprocessable(f"cannot calibrate {model}: {err}") from err
