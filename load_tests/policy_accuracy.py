"""Accuracy on the test split at full depth and under exit policies, through the real engine.

For a bundle (or preset) and its test data: every test sample answered in-process by the engine
at full depth, under the bundle's default policy, and under thresholds calibrated to each
`--target` agreement on the bundle's (validation) calibration data; per policy the accuracy, the
agreement with full depth, the mean number of stages run and the compute fraction (FLOPs,
each text row at its own length).

    python -m load_tests.policy_accuracy sentiment --out docs/results/policy-sentiment-cpu2
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

import numpy as np


async def answers(bundle: Any, policy: Any, data: Any, early: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, exit stages, probabilities) of every sample of `data`, answered by the engine."""
    from load_tests.bench import model_input
    from server.engine.engine import Engine
    from server.metrics import Metrics
    from server.settings import Settings

    engine = Engine([bundle], Settings(intra_op_threads=0, max_batch_size=64, max_queue_size=4096), Metrics(),
                    {bundle.name: policy})
    await engine.start()
    try:
        to_input = model_input(bundle)
        labels, stages, probs = [], [], []
        for i in range(0, len(data), 64):
            result = await engine.infer(bundle.name, to_input(data.x[i:i + 64]), early_exit=early, direct=False)
            labels.append(result.labels)
            stages.append(result.exit_stage)
            probs.append(result.probabilities)
    finally:
        await engine.stop()
    return np.concatenate(labels), np.concatenate(stages), np.concatenate(probs)


def evaluate(bundle_dir: Path, targets: list[float]) -> dict[str, Any]:
    from load_tests.bench import machine
    from load_tests.data import test_split_for
    from server.bundle import load_bundle
    from server.control.calibrate import calibrate
    from server.policy import ExitPolicy

    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    data = test_split_for(m)
    full, _, _ = asyncio.run(answers(bundle, m.default_policy.with_version(1), data, early=False))
    policies = {"default": m.default_policy}
    for t in targets:
        policies[f"in-sample point estimate {t:g}"] = ExitPolicy(
            m.default_policy.criterion, tuple(calibrate(bundle.calibration(), m, target_agreement=t).thresholds))
    cum = np.asarray(m.cumulative_flops(), float)
    rows = [{"policy": "full depth", "thresholds": None, "accuracy": float((full == data.y).mean()),
             "agreement": 1.0, "mean_stages": float(m.num_stages), "compute_fraction": 1.0}]
    for name, policy in policies.items():
        labels, stages, _ = asyncio.run(answers(bundle, policy.with_version(1), data, early=True))
        rows.append({"policy": name, "thresholds": list(policy.thresholds),
                     "accuracy": float((labels == data.y).mean()), "agreement": float((labels == full).mean()),
                     "mean_stages": float((stages + 1).mean()),
                     "compute_fraction": float(cum[stages].sum() / (cum[-1] * len(stages)))})
    return {"bundle": m.name, "samples": len(data), "rows": rows, "machine": machine()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", help="bundle directory or preset")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--target", type=float, nargs="+", default=[0.99, 0.98])
    args = parser.parse_args(argv)
    from load_tests.bench import resolve_bundle
    from load_tests.bench_report import save_table

    report = evaluate(resolve_bundle(args.bundle), args.target)
    header = ["policy", "accuracy", "agreement with full depth", "mean stages run",
              "compute fraction (FLOPs at the manifest's mean length)"]
    rows = [[r["policy"], f"{r['accuracy']:.4f}", f"{r['agreement']:.4f}", f"{r['mean_stages']:.2f}",
             f"{r['compute_fraction']:.3f}"] for r in report["rows"]]
    title = f"{report['bundle']}: {report['samples']} test samples, through the engine in-process"
    print(save_table(args.out, "policy_accuracy", report, title, header, rows), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
