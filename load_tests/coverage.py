"""Does the calibration guarantee hold on held-out data? 200 random calibration / test resplits.

For a bundle, every exit's outputs on its validation and test samples (the ONNX stages, run here)
are pooled; each resplit draws half of them as calibration data, calibrates with a guarantee
(server/control/guarantee.py) and, for comparison, with the in-sample point estimate
(server/control/calibrate.py), and measures the agreement with full depth on the other half. The
figure is the share of resplits whose held-out agreement meets the target, per criterion the bundle
serves (the guarantee promises >= confidence), with the mean compute fraction it costs.

    python -m load_tests.coverage demo --target 0.97 --out docs/results/coverage-demo
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np


def exit_outputs(bundle: Any, features: Any) -> Any:
    """Every stage's logits (and gate / similarity) on `features` (model inputs), as Calibration."""
    from load_tests.bench import model_input
    from server.bundle import Calibration
    from server.engine.runtime import OrtStageRunner
    from server.settings import Settings

    runner = OrtStageRunner(bundle, Settings(intra_op_threads=0))
    to_input = model_input(bundle)
    logits, gates, sims = [], [], []
    for first in range(0, len(features), 128):
        x: Any = to_input(features[first:first + 128])
        per = ([], [], [])
        for stage in range(runner.num_stages):
            out = runner.run(stage, x)
            per[0].append(out.logits)
            per[1].append(out.gate if out.gate is not None else np.full(len(out), np.nan, np.float32))
            per[2].append(out.similarity if out.similarity is not None else np.full(len(out), np.nan, np.float32))
            x = out.hidden
        logits.append(np.stack(per[0]))
        gates.append(np.stack(per[1]))
        sims.append(np.stack(per[2]))
    runner.close()
    gate, sim = np.concatenate(gates, 1), np.concatenate(sims, 1)
    return Calibration(labels=np.zeros(gate.shape[1], np.int64), logits=np.concatenate(logits, 1),
                       gate=None if np.isnan(gate[:-1]).all() else gate,
                       similarity=None if np.isnan(sim[1:-1]).all() else sim)


def pooled(bundle: Any) -> Any:
    """Validation + test samples of the bundle's data set, with true labels."""
    from server.bundle import Calibration

    if bundle.manifest.text is not None:
        from model_export.sentiment import sentiment_splits

        s = sentiment_splits()
        parts = [(np.array(s.val.texts, dtype=object), s.val.y), (np.array(s.test.texts, dtype=object), s.test.y)]
    else:
        from load_tests.data import bundle_dataset
        from model_export.data import load_splits

        s = load_splits(bundle_dataset(bundle.manifest))
        parts = [(s.val.x, s.val.y), (s.test.x, s.test.y)]
    outs = [exit_outputs(bundle, x) for x, _ in parts]
    y = np.concatenate([p[1] for p in parts])

    def cat(name: str) -> Any:
        arrays = [getattr(o, name) for o in outs]
        return None if any(a is None for a in arrays) else np.concatenate(arrays, 1)

    return Calibration(labels=y, logits=cat("logits"), gate=cat("gate"), similarity=cat("similarity"))


def run(bundle_dir: Path, target: float, confidence: float, resplits: int, seed: int) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from load_tests.bench import machine
    from server.bundle import load_bundle
    from server.control.calibrate import available_criteria, calibrate, simulate
    from server.control.guarantee import guaranteed, subset

    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    data = pooled(bundle)
    n = len(data.labels)
    criteria = available_criteria(m, data)
    rng = np.random.default_rng(seed)
    rows: dict[str, dict[str, list[float]]] = {c: {"certified": [], "point": [], "compute": [], "point_compute": []}
                                                for c in criteria}
    for r in tqdm(range(resplits), desc=f"coverage {m.name}", unit="resplit"):
        order = rng.permutation(n)
        calib, held = subset(data, np.sort(order[: n // 2])), subset(data, np.sort(order[n // 2:]))
        for c in criteria:
            g = guaranteed(calib, m, target_agreement=target, confidence=confidence, criterion=c, seed=r)
            report = simulate(held, c, g.thresholds, m)
            rows[c]["certified"].append(report.agreement)
            rows[c]["compute"].append(report.compute_fraction)
            try:
                p = calibrate(calib, m, target_agreement=target, criterion=c).thresholds
            except ValueError:
                p = [None] * (m.num_stages - 1)
            point = simulate(held, c, p, m)
            rows[c]["point"].append(point.agreement)
            rows[c]["point_compute"].append(point.compute_fraction)
    summary = {c: {"met_certified": float(np.mean(np.asarray(v["certified"]) >= target)),
                   "met_point_estimate": float(np.mean(np.asarray(v["point"]) >= target)),
                   "mean_agreement_certified": float(np.mean(v["certified"])),
                   "mean_compute_certified": float(np.mean(v["compute"])),
                   "mean_compute_point_estimate": float(np.mean(v["point_compute"]))} for c, v in rows.items()}
    return {"bundle": m.name, "samples": n, "target_agreement": target, "confidence": confidence,
            "resplits": resplits, "seed": seed, "criteria": summary, "machine": machine()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", help="bundle directory or preset (demo, sentiment, heavy)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--target", type=float, default=0.99)
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--resplits", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from load_tests.bench import resolve_bundle
    from load_tests.bench_report import save_table

    report = run(resolve_bundle(args.bundle), args.target, args.confidence, args.resplits, args.seed)
    title = (f"{report['bundle']}: {report['samples']} validation + test samples, {args.resplits} random halves as "
             f"calibration data, agreement with full depth on the other half; target {args.target:g}, "
             f"confidence {args.confidence:g}")
    header = ["criterion", "certified: share meeting the target", "mean held-out agreement", "mean compute",
              "point estimate: share meeting it", "its mean compute"]
    rows = [[c, f"{v['met_certified']:.3f}", f"{v['mean_agreement_certified']:.4f}",
             f"{v['mean_compute_certified']:.3f}", f"{v['met_point_estimate']:.3f}",
             f"{v['mean_compute_point_estimate']:.3f}"]
            for c, v in report["criteria"].items()]
    print(save_table(args.out, "coverage", report, title, header, rows), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
