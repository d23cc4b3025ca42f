"""Coverage of the served conformal prediction sets (server/conformal.py) on the test split.

Every test sample is answered in-process by the engine (under the bundle's default policy, and at
full depth); its set is built from its served probabilities and exit stage with the quantiles of
the bundle's (validation) calibration data, as the server builds it, at the manifest's coverage and
at each `--coverage` asked. Per exit: the answers it gave, the share whose set holds the true
label, the mean set size and the share of empty sets.

    python -m load_tests.conformal BUNDLE --out docs/results/conformal-jei-digits
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

import numpy as np


def evaluate(bundle_dir: Path, levels: list[float], agreement: float) -> dict[str, Any]:
    from load_tests.bench import machine
    from load_tests.data import test_split_for
    from load_tests.policy_accuracy import answers
    from server.bundle import ConformalSpec, load_bundle
    from server.conformal import exit_quantiles, sets_from
    from server.control.calibrate import calibrate
    from server.control.guarantee import clopper_pearson
    from server.policy import ExitPolicy

    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    data = test_split_for(m)
    calibration = bundle.calibration()
    spec = m.conformal or ConformalSpec(coverage=levels[0])
    levels = list(dict.fromkeys([spec.coverage, *levels]))
    fit = calibrate(calibration, m, target_agreement=agreement, criterion=m.default_policy.criterion)
    policies = {"default policy": m.default_policy,
                f"calibrated to {agreement:g} agreement": ExitPolicy(fit.criterion, tuple(fit.thresholds)),
                "full depth": None}
    rows = []
    for depth, chosen in policies.items():
        policy = (chosen or m.default_policy).with_version(1)
        _, stages, probs = asyncio.run(answers(bundle, policy, data, early=chosen is not None))
        key = None if chosen is None else (policy.criterion, list(policy.thresholds))
        for level in levels:
            q = exit_quantiles(calibration, spec.model_copy(update={"coverage": level}), key)
            sets = sets_from(probs, stages, q)
            hit = sets[np.arange(len(data)), data.y]
            for s in [*range(m.num_stages), None]:
                at = np.ones(len(data), bool) if s is None else stages == s
                if not at.any():
                    continue
                lo, hi = clopper_pearson(int(hit[at].sum()), int(at.sum()), 0.95)
                rows.append({"answers": depth, "coverage asked": level, "exit": "all" if s is None else s,
                             "samples": int(at.sum()), "coverage": float(hit[at].mean()), "ci95": [lo, hi],
                             "mean set size": float(sets[at].sum(axis=1).mean()),
                             "empty sets": float((sets[at].sum(axis=1) == 0).mean()),
                             "quantile": None if s is None else float(q[s])})
    return {"bundle": m.name, "samples": len(data), "calibration_samples": int(calibration.labels.shape[0]),
            "min_exit_samples": spec.min_exit_samples, "rows": rows, "machine": machine()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", help="bundle directory or preset")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--coverage", type=float, nargs="+", default=[0.9, 0.95, 0.99])
    parser.add_argument("--agreement", type=float, default=0.9,
                        help="also answer under thresholds calibrated to this agreement (more exits) [0.9]")
    args = parser.parse_args(argv)
    from load_tests.bench import resolve_bundle
    from load_tests.bench_report import save_table

    report = evaluate(resolve_bundle(args.bundle), args.coverage, args.agreement)
    header = ["answers", "coverage asked", "exit", "samples", "coverage on test (95 % CI)", "mean set size",
              "empty sets"]
    rows = [[r["answers"], f"{r['coverage asked']:g}", str(r["exit"]), str(r["samples"]),
             f"{r['coverage']:.3f} ({r['ci95'][0]:.3f}-{r['ci95'][1]:.3f})",
             f"{r['mean set size']:.2f}", f"{r['empty sets']:.3f}"] for r in report["rows"]]
    title = (f"{report['bundle']}: conformal sets on {report['samples']} test samples (quantiles from "
             f"{report['calibration_samples']} validation samples), through the engine in-process")
    print(save_table(args.out, "conformal", report, title, header, rows), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
