"""`offramp calibrate`: thresholds for a target from a bundle's calibration data, printed as a
table, optionally plotted (agreement and accuracy against compute for every criterion) and stored
as the bundle's default policy. The search itself is `server.control.calibrate`; agreement and
accuracy targets are certified at `--confidence` by `server.control.guarantee` unless
`--point-estimate` asks for the cheapest thresholds that meet the target in-sample."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from server.bundle import Manifest
from server.control.calibrate import TARGETS, CalibrationResult, available_criteria, calibrate, frontier
from server.policy import ExitPolicy


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `offramp calibrate` to the CLI."""
    parser = subparsers.add_parser(
        "calibrate", help="choose per-exit thresholds for a target from a bundle's calibration data",
        description="Choose per-exit thresholds that meet a target on the bundle's calibration data at the "
        "least expected compute; print them with the expected exit histogram, compute, agreement and "
        "accuracy.",
    )
    parser.add_argument("bundle", type=Path, metavar="DIR", help="bundle directory")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-agreement", type=float, metavar="FRAC",
                        help="least share of answers agreeing with the full model, e.g. 0.99")
    target.add_argument("--target-accuracy", type=float, metavar="FRAC", help="least accuracy on the labels")
    target.add_argument("--compute-budget", type=float, metavar="FRAC",
                        help="most expected compute, as a fraction of full-depth FLOPs "
                        "(best agreement within it)")
    parser.add_argument("--confidence", type=float, default=0.95, metavar="P",
                        help="agreement / accuracy targets: met with at least this probability on new data "
                        "(Learn then Test, docs/admin.md) [0.95]")
    parser.add_argument("--point-estimate", action="store_true",
                        help="the cheapest thresholds meeting the target on the calibration samples themselves "
                        "(no guarantee: new data usually misses it)")
    parser.add_argument("--criterion", default="all",
                        help="exit criterion to calibrate, or 'all' for every one the bundle supports [all]")
    parser.add_argument("--plot", type=Path, metavar="FILE.png",
                        help="write agreement and accuracy against compute fraction for each criterion")
    parser.add_argument("--write-default", action="store_true",
                        help="store the best result as the bundle's default policy in manifest.json")
    parser.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    from server.bundle import BundleError, load_bundle, write_manifest

    try:
        bundle = load_bundle(args.bundle)
        calib = bundle.calibration()
    except BundleError as err:
        print(f"offramp calibrate: {err}", file=sys.stderr)
        return 2
    manifest = bundle.manifest
    usable = available_criteria(manifest, calib)
    criteria = usable if args.criterion == "all" else [args.criterion]
    if args.criterion != "all" and args.criterion not in usable:
        print(f"offramp calibrate: criterion {args.criterion!r} is not available for this bundle; "
              f"choose from {usable} or 'all'", file=sys.stderr)
        return 2
    (target, value), = ((k, getattr(args, k)) for k in TARGETS if getattr(args, k) is not None)
    if not args.point_estimate and target != "compute_budget":
        return _certified(args, bundle, calib, criteria, target, value)
    results: dict[str, CalibrationResult] = {}
    for criterion in criteria:
        try:
            results[criterion] = calibrate(calib, manifest, criterion=criterion, **{target: value})
        except ValueError as err:
            print(f"{criterion}: {err}", file=sys.stderr)
            if "must be in" in str(err):
                return 2
    print(results_table(manifest, len(calib.labels), target, value, results))

    status = 0 if results else 1
    if args.plot is not None:
        chosen = {c: (r.report.compute_fraction, r.report.agreement, r.report.accuracy)
                  for c, r in results.items()}
        status = _plot(args.plot, calib, manifest, criteria, chosen, target, value) or status
    if args.write_default and results:
        best = best_result(results)
        spec = ExitPolicy(best.criterion, tuple(best.thresholds))
        path = write_manifest(bundle.root, manifest.model_copy(update={"default_policy": spec}))
        print(f"default policy written to {path}: {best.criterion} {_show(best.thresholds)}")
    return status


def _plot(path: Path, calib: Any, manifest: Manifest, criteria: list[str],
          chosen: dict[str, tuple[float, float, float]], target: str, value: float) -> int:
    from server.control.plots import PlotUnavailable, plot_frontiers

    curves = {c: frontier(calib, manifest, c) for c in criteria}
    try:
        written = plot_frontiers(curves, path, chosen=chosen, target=(target, value),
                                 title=f"{manifest.name}: quality against compute (calibration data)")
    except PlotUnavailable as err:
        print(f"offramp calibrate: {err}", file=sys.stderr)
        return 2
    print(f"plot written to {written}")
    return 0


def _certified(args: argparse.Namespace, bundle: Any, calib: Any, criteria: list[str], target: str,
               value: float) -> int:
    """`offramp calibrate` with a guarantee: a table of held-out figures, the cheapest certified written."""
    from server.bundle import write_manifest
    from server.control.guarantee import guaranteed

    manifest = bundle.manifest
    results = {}
    # The cheapest of several criteria is chosen on the same data: each is certified at a share of the
    # error budget (Bonferroni), so the one written keeps the promise.
    each = 1.0 - (1.0 - args.confidence) / len(criteria)
    for criterion in criteria:
        try:
            results[criterion] = guaranteed(calib, manifest, criterion=criterion, confidence=each,
                                            **{target: value})  # type: ignore[arg-type]
        except ValueError as err:
            print(f"{criterion}: {err}", file=sys.stderr)
            if "must be in" in str(err):
                return 2
    what = "agreement" if target == "target_agreement" else "accuracy"
    lines = [f"{manifest.name}: {len(calib.labels)} calibration samples, {what} >= {value:g} with probability "
             f">= {args.confidence:g} for the best of {len(criteria)} criteria, each certified at {each:.4g} (Learn "
             f"then Test; figures on the test part, with a Clopper-Pearson interval at that confidence)",
             f"{'criterion':<11}{'family':>11}{'compute':>9}{what:>10}{'interval':>17}  thresholds"]
    for criterion, r in results.items():
        q = r.held_out.agreement if what == "agreement" else r.held_out.accuracy
        lines.append(f"{criterion:<11}{r.family:>11}{r.held_out.compute_fraction:>9.3f}{q:>10.4f}"
                     f"{f'[{r.interval[0]:.4f}, {r.interval[1]:.4f}]':>17}  {_show(r.thresholds)}")
    if not results:
        print("\n".join(lines + ["no criterion can be certified"]))
        return 1
    best = min(results.values(), key=lambda r: r.held_out.compute_fraction)
    lines.append(f"best: {best.criterion} (held-out compute {best.held_out.compute_fraction:.3f} of full depth"
                 + ("" if best.certified else "; nothing certified: every exit off") + ")")
    print("\n".join(lines))
    status = 0
    if args.plot is not None:  # the chosen points: held-out figures
        chosen = {c: (r.held_out.compute_fraction, r.held_out.agreement, r.held_out.accuracy)
                  for c, r in results.items()}
        status = _plot(args.plot, calib, manifest, criteria, chosen, target, value)
    if args.write_default:
        spec = ExitPolicy(best.criterion, tuple(best.thresholds))
        path = write_manifest(bundle.root, manifest.model_copy(update={"default_policy": spec}))
        print(f"default policy written to {path}: {best.criterion} {_show(best.thresholds)}")
    return status


def best_result(results: dict[str, CalibrationResult]) -> CalibrationResult:
    """The criterion that meets the target most cheaply (for a budget: with the best agreement)."""
    def rank(r: CalibrationResult) -> tuple[float, float]:
        if r.target == "compute_budget":
            return -r.report.agreement, r.report.compute_fraction
        quality = r.report.agreement if r.target == "target_agreement" else r.report.accuracy
        return r.report.compute_fraction, -quality

    return min(results.values(), key=rank)


def results_table(manifest: Manifest, samples: int, target: str, value: float,
                  results: dict[str, CalibrationResult]) -> str:
    goal = {"target_agreement": "agreement >=", "target_accuracy": "accuracy >=",
            "compute_budget": "compute <="}
    lines = [
        f"{manifest.name}: {manifest.num_stages} stages, {samples} calibration samples, "
        f"target {goal[target]} {value:g}",
        f"{'criterion':<11}{'compute':>8}{'agreement':>10}{'accuracy':>9}{'global':>8}  "
        f"{'exits per stage':<{6 * manifest.num_stages}} thresholds",
    ]
    for criterion, r in results.items():
        exits = " ".join(f"{h:>5.0%}" for h in r.report.exit_histogram)
        lines.append(
            f"{criterion:<11}{r.report.compute_fraction:>8.3f}{r.report.agreement:>10.4f}"
            f"{r.report.accuracy:>9.4f}{r.global_report.compute_fraction:>8.3f}  "
            f"{exits:<{6 * manifest.num_stages}} {_show(r.thresholds)}"
        )
    if results:
        best = best_result(results)
        lines.append(f"best: {best.criterion} (compute {best.report.compute_fraction:.3f} of full depth; "
                     "'global' is the compute of the best single threshold for all exits)")
    else:
        lines.append("no criterion meets the target on the calibration data")
    return "\n".join(lines)


def _show(thresholds: Sequence[float | None]) -> str:
    return "[" + ", ".join("null" if t is None else f"{t:.6g}" for t in thresholds) + "]"
